"""Sphinx configuration of forkref's documentation (`make docs` builds it with -W -n).

The build never needs the network. intersphinx reads every inventory from a file:
- Python and pandas: the objects.inv of their HTML docs as Debian ships them
  (python3.11-doc 3.11.2, python-pandas-doc 1.5.3), kept in docs/_intersphinx/ and
  mapped to the docs of those same versions, so every link they make exists.
- numpy and Ray have no such package: their inventories are written below from the
  short list of names these docs refer to, with the addresses of those names in the
  projects' published docs. A reference to a name not listed here fails the build
  (nitpicky), so add it to the list when you refer to it.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import forkref  # noqa: E402  (after the path is set)

project = "forkref"
author = "The forkref developers"
copyright = "2026, The forkref developers"
release = forkref.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_intersphinx", "Thumbs.db", ".DS_Store"]

html_theme = "furo"
html_title = f"forkref {release}"
html_static_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

nitpicky = True
# Names the public docstrings mention that have no page of their own: private parts of
# forkref that the text describes but that are not API, and stdlib names that Python's
# inventory does not list as objects.
nitpick_ignore = [
    # Type variables of forkref's generic classes and functions.
    *(
        (role, f"forkref.{module}.{var}")
        for role in ("py:class", "py:obj")
        for module, names in {
            "_memory.compact": "T",
            "_memory.compactdict": "KV",
            "_pools.pool": "T",
            "_pools.executor": "T",
            "_share.handle": "T",
        }.items()
        for var in names
    ),
    *(("py:class", var) for var in "TKV"),
    # Private classes that public signatures name: the pools' shared base, the iterator
    # that imap returns (the stdlib documents no IMapIterator either), what a handle
    # pickles to, and the accepted pid sources (an alias).
    ("py:class", "forkref._pools.base.PoolBase"),
    *(("py:class", f"forkref._pools.{module}.IMapIterator") for module in ("pool", "results")),
    ("py:class", "forkref._refs.registry.Reference"),
    ("py:class", "Pids"),
    ("py:class", "PidSource"),
    # Undocumented in the stdlib's own docs, so Python's inventory has no entry for them.
    ("py:class", "BaseContext"),
    ("py:class", "multiprocessing.context.BaseContext"),
    ("py:class", "multiprocessing.pool.MaybeEncodingError"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become attribute entries, so text can link to a field
# (:attr:`ProcessMemory.segment_rss`).
napoleon_use_ivar = False

# -- intersphinx, offline ---------------------------------------------------------------

INVENTORIES = HERE / "_intersphinx"
GENERATED = HERE / "_build" / "_intersphinx"

#: name -> (role, path under the project's docs) for the inventories written here.
NUMPY = {
    "numpy.ndarray": ("class", "reference/generated/numpy.ndarray.html#numpy.ndarray"),
    "numpy.memmap": ("class", "reference/generated/numpy.memmap.html#numpy.memmap"),
}
RAY = {
    "ray.init": ("function", "ray-core/api/doc/ray.init.html#ray.init"),
    "ray.put": ("function", "ray-core/api/doc/ray.put.html#ray.put"),
    "ray.get": ("function", "ray-core/api/doc/ray.get.html#ray.get"),
    "ray.remote": ("function", "ray-core/api/doc/ray.remote.html#ray.remote"),
    "ray.ObjectRef": ("class", "ray-core/api/doc/ray.ObjectRef.html#ray.ObjectRef"),
    "ray.util.multiprocessing.Pool": ("class", "ray-more-libs/multiprocessing.html"),
}


def write_inventory(path: Path, name: str, entries: dict[str, tuple[str, str]]) -> str:
    """Write a Sphinx objects.inv (version 2) listing ``entries``; return its path."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {name}\n# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = "".join(f"{obj} py:{role} 1 {uri} -\n" for obj, (role, uri) in sorted(entries.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + zlib.compress(body.encode()))
    return str(path)


intersphinx_mapping = {
    "python": ("https://docs.python.org/3.11/", str(INVENTORIES / "python-3.11.inv")),
    "pandas": (
        "https://pandas.pydata.org/pandas-docs/version/1.5/",
        str(INVENTORIES / "pandas-1.5.inv"),
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        write_inventory(GENERATED / "numpy.inv", "NumPy", NUMPY),
    ),
    "ray": (
        "https://docs.ray.io/en/latest/",
        write_inventory(GENERATED / "ray.inv", "Ray", RAY),
    ),
}
intersphinx_timeout = 1

#: Where a type hint names a class by the module that defines it, the name it is
#: documented under.
ALIASES = {
    "concurrent.futures._base.Future": "concurrent.futures.Future",
    "concurrent.futures._base.Executor": "concurrent.futures.Executor",
    "_pickle.PicklingError": "pickle.PicklingError",
    # forkref's own results have the stdlib's API, which documents it.
    "AsyncResult": "multiprocessing.pool.AsyncResult",
    "MapResult": "multiprocessing.pool.AsyncResult",
}


def _alias(app: object, env: object, node: dict[str, str], contnode: object) -> None:
    """Point a reference at the name its target is documented under; intersphinx resolves it."""
    name = node.get("reftarget", "")
    if name.startswith("forkref._"):
        # forkref's private classes are named here by their class name, so that moving
        # one to another private module changes nothing.
        name = name.rsplit(".", 1)[-1]
    target = ALIASES.get(name)
    if target is not None:
        node["reftarget"] = target


def setup(app: object) -> None:
    app.connect("missing-reference", _alias, priority=100)  # type: ignore[attr-defined]


# -- generated pages ----------------------------------------------------------------------


def write_deviations(source: Path, target: Path) -> None:
    """conformance/deviations.toml as a Markdown table, for the pools page to include."""
    import tomllib

    deviations = tomllib.loads(source.read_text())["deviation"]
    rows = ["| test | start methods | why forkref differs |", "|---|---|---|"]
    for item in deviations:
        methods = ", ".join(item.get("methods", ["fork", "forkserver", "spawn"]))
        reason = " ".join(item["reason"].split()).replace("|", "\\|")
        rows.append(f"| `{item['test']}` | {methods} | {reason} |")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(rows) + "\n")


write_deviations(
    HERE.parent / "conformance" / "deviations.toml",
    HERE / "_build" / "_generated" / "deviations.md",
)


def write_architecture(source: Path, target: Path) -> None:
    """The repository's ARCHITECTURE.md for the "Architecture" page, or a pointer to it.

    Links into the repository (paths such as ``src/forkref/_engine/``) are not pages of
    this site, so they become plain text; web links stay.
    """
    import re

    if source.exists():
        text = source.read_text()
        text = re.sub(r"\[([^\]]+)\]\((?!https?://)[^)]*\)", r"\1", text)
    else:
        text = (
            "# Architecture\n\n"
            "The layers of `src/forkref/` are described in the repository's "
            "`ARCHITECTURE.md` and in each subpackage's `__init__.py`; "
            "[the data path](data-path.md) follows a task and a shared object through them.\n"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


write_architecture(
    HERE.parent / "ARCHITECTURE.md", HERE / "_build" / "_generated" / "architecture.md"
)
