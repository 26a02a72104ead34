"""The launchers behind the engine's one interface, and the one place that picks one.

``process`` (``context.Process`` workers, for spawn and forkserver),
``zygote`` (fork servers, for fork), ``ray`` (Ray actors), ``choose`` (which
launcher a pool gets). The launchers do not know each other. Imports
:mod:`forkref._engine` and below.
"""
