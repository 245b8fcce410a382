"""Handing freed memory back to the system after a burst.

glibc's ``malloc`` keeps what Python frees on its heap for reuse, and after a
burst of big allocations (one reactor turn of many 60 KB messages: the
frames, their joined copy, Autobahn's read buffers) tens of MB can stay
resident long after every object is gone: freed, never returned.  Python
never asks for it back; ``malloc_trim`` does.  It walks the heap, so it is
called only after rare big turns (see ``Room.flush``), never per message.
"""

from __future__ import annotations

import ctypes


def release_free_heap() -> bool:
    """
    Return the C heap's free pages to the system; ``False`` where the C
    library has no ``malloc_trim`` (musl, macOS), which is harmless.
    """
    # The process's own symbols: the C library Python runs on, found without
    # searching (ctypes.util.find_library would start a subprocess).
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True
