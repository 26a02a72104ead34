"""The Ray backend: a pool's workers as Ray actors, shared objects in Ray's object store.

Ray is optional and is imported lazily, inside functions, never at import.
"""
