"""Public result objects read well: print() a report for a table, repr() for one line.

Real objects only: a real pool's memory report, a real export, real containers.
"""

from __future__ import annotations

import os
import re

import numpy as np

import forkref
from forkref._launchers.ray.memory import ObjectStoreUse, RayMemoryReport


def _square(x: int) -> int:
    return x * x


def test_print_pool_memory_shows_a_table_of_every_process() -> None:
    with forkref.Pool(2) as pool:
        assert pool.map(_square, range(4)) == [0, 1, 4, 9]
        report = pool.memory()
    table = str(report)
    assert table == report.table()
    lines = table.splitlines()
    assert lines[0].split() == ["pid", "role", "rss", "uss", "pss", "shared", "segments", "own_uss"]
    # The report's own processes: a second worker may still be starting when a
    # four-item map is done, so pool.pids() read apart from it can differ.
    pids = [p.pid for p in report.processes]
    assert os.getpid() in pids
    assert len(pids) >= 2  # the parent and at least the worker that ran the map
    for pid in pids:
        assert any(line.split()[0] == str(pid) for line in lines[1:]), (pid, table)
    assert lines[len(report.processes) + 1].split()[0] == "total"
    assert "rss=" not in table  # no dataclass dump in bytes


def test_report_repr_is_one_line_with_the_totals() -> None:
    report = forkref.memory_report([os.getpid()])
    text = repr(report)
    assert "\n" not in text
    assert text.startswith("<forkref.MemoryReport of 1 process: total uss ")
    assert f"{report.total_uss / 2**20:,.1f} MiB" in text
    assert "print() it for the table" in text


def test_process_memory_repr_is_in_mib() -> None:
    record = forkref.memory_report([os.getpid()]).processes[0]
    text = repr(record)
    assert text.startswith(f"<forkref.ProcessMemory pid {os.getpid()} (parent): uss ")
    assert re.search(r"pss [\d,]+\.\d MiB", text), text


def test_ray_report_adds_the_object_stores() -> None:
    base = forkref.memory_report([os.getpid()])
    store = ObjectStoreUse("a1b2c3d4e5f6", "10.0.0.5", 3 * 2**20, 2**30)
    report = RayMemoryReport(base.processes, object_stores=(store,))
    expected = "<forkref.ObjectStoreUse node 10.0.0.5 (a1b2c3d4): 3.0 of 1,024.0 MiB used>"
    assert repr(store) == expected
    assert "object stores 3.0 MiB used" in repr(report)
    assert str(report).splitlines()[-1] == "object store 10.0.0.5: 3.0 of 1,024.0 MiB used"
    unknown = RayMemoryReport(base.processes, object_store_error="Ray would not tell")
    assert str(unknown).splitlines()[-1] == "object stores: Ray would not tell"


def test_explanation_repr_names_the_route() -> None:
    explanation = forkref.explain(np.zeros(2**18))
    text = repr(explanation)
    assert text.startswith("<forkref.Explanation numpy.ndarray of about 2.0 MiB: ")
    assert explanation.route in text
    assert "\n" not in text


def _export(n: int) -> forkref.ResultToken:
    return forkref.export_result(np.ones(n))


def test_result_token_repr_says_what_to_do_with_it() -> None:
    with forkref.Pool(1) as pool:
        token = pool.apply(_export, (2**17,))
    text = repr(token)
    assert re.match(r"<forkref\.ResultToken ndarray, 1\.0 MiB in /\S+/forkref-r-[0-9a-f]+; ", text)
    assert "forkref.import_result()" in text
    assert forkref.import_result(token).sum() == 2**17


def test_shared_repr_names_the_type_and_its_state() -> None:
    handle = forkref.share({"a": 1})
    assert re.fullmatch(r"<forkref\.Shared builtins\.dict key=[0-9a-f]{12}>", repr(handle))
    handle.release()
    assert repr(handle) == "<forkref.Shared builtins.dict released>"


def test_compact_reprs_show_their_first_items() -> None:
    items = forkref.compact({"id": i} for i in range(1000))
    assert re.fullmatch(
        r"<forkref\.CompactList of 1,000 items \([\d,]+ bytes of buffers\): "
        r"\[\{'id': 0\}, \{'id': 1\}, \{'id': 2\}, \.\.\.\]>",
        repr(items),
    )
    one = forkref.compact_dict({"k": [1, 2]})
    assert re.fullmatch(
        r"<forkref\.CompactDict of 1 item \([\d,]+ bytes of buffers\): \{'k': \[1, 2\]\}>",
        repr(one),
    )
