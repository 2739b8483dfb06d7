"""What the readers do with a sample or shard that fails: skip it and count it when the failure is one that
corrupt data raises, stop the run when too many of the recent ones fail, and let anything else (a bug)
propagate with its traceback.

Corrupt: the exceptions that reading a tar, parsing json, decoding UTF-8 and decoding an image raise on bad
bytes (`CORRUPT`), plus decode_sample's own ValueErrors for a sample without an image, json, report or labels.
A TypeError, AttributeError, NameError, KeyError, RuntimeError ... from the pipeline's code is a bug: decode_sample
checks what it looks up, so a KeyError cannot mean a missing member.

The ceiling: each reader (one per DataLoader worker, or the main process with num_workers=0) keeps the outcome
of the last `WINDOW` things it read (a sample decoded or not, a shard that could not be opened or read). When more
than `max_skip_frac x WINDOW` of them failed, the reader raises SkipRateError naming the most frequent failure
and its first sample (key and shard). Fewer than WINDOW reads count as if the rest had succeeded, so a handful of
corrupt samples at the start of a stream is no reason to stop, while a systematic error (every sample failing, a
shard list that cannot be opened) stops the run within ~`max_skip_frac x WINDOW` reads instead of cycling
silently for ever. DataLoader re-raises a worker's exception in the main process.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from collections import Counter, deque
from typing import Optional

from PIL import Image

WINDOW = 200  # reads per reader that the ceiling looks back over

# What bad bytes raise while a tar is read, a json parsed, UTF-8 or an image decoded. OSError covers PIL's
# UnidentifiedImageError and "image file is truncated", ValueError json.JSONDecodeError and UnicodeDecodeError.
CORRUPT: tuple[type[BaseException], ...] = (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, struct.error,
                                            Image.DecompressionBombError)


class SkipRateError(RuntimeError):
    """More of a reader's recent samples failed than data.max_skip_frac allows."""

    def __str__(self) -> str:
        # webdataset appends its stream and url to the args of an exception passing through its tar reader
        return str(self.args[0]) if self.args else ""


def _kind(exc: BaseException, message: str) -> str:
    """'Type: message', without what differs between samples of the same failure (paths, object addresses), so
    that failures can be counted by kind."""
    if isinstance(exc, OSError) and exc.strerror:
        message = exc.strerror  # an errno error: its path is named as where it happened
    return f"{type(exc).__name__}: {re.sub(r' at 0x[0-9a-f]+', '', message)}"[:300]


class SkipLedger:
    """One reader's skipped samples: the running count (Batch.skipped) and the window the ceiling looks at.
    Each DataLoader worker has its own copy (the pipeline holding it is copied into every worker)."""

    def __init__(self, max_skip_frac: float = 0.05):
        self.max_skip_frac = max_skip_frac
        self.count = 0
        self.window: deque[Optional[tuple[str, str]]] = deque()  # None (read) or (kind, where) (failed)
        self.failures = 0  # in the window

    def ok(self) -> None:
        self._push(None)

    def failed(self, exc: BaseException, key: Optional[str] = None, url: Optional[str] = None,
               message: Optional[str] = None) -> None:
        """Count a corrupt sample (or shard: no key) and carry on; raise SkipRateError if the window now holds
        too many failures."""
        self.count += 1
        where = f"sample {key} in {url or '?'}" if key is not None else f"shard {url or '?'}"
        self._push((_kind(exc, str(exc) if message is None else message), where))
        if self.failures > self.max_skip_frac * WINDOW:
            raise SkipRateError(self._message()) from exc

    def shard_failed(self, exc: BaseException) -> bool:
        """webdataset's exception handler for opening and reading tars: True = skip and go on. Re-raises what
        corrupt data does not raise (and a SkipRateError on its way out through the tar reader)."""
        if not isinstance(exc, CORRUPT):
            raise exc
        # webdataset appends the shard's url (and stream) to the args, and " @ <stream>" to a member's message
        url = next((a for a in reversed(exc.args[1:]) if isinstance(a, str)), None)
        self.failed(exc, url=url, message=str(exc.args[0]).split(" @ ")[0] if exc.args else "")
        return True

    def _push(self, entry: Optional[tuple[str, str]]) -> None:
        self.window.append(entry)
        self.failures += entry is not None
        if len(self.window) > WINDOW:
            self.failures -= self.window.popleft() is not None

    def _message(self) -> str:
        failed = [e for e in self.window if e is not None]
        kind, n = Counter(k for k, _ in failed).most_common(1)[0]
        first = next(where for k, where in failed if k == kind)
        return (f"{self.failures} of the last {len(self.window)} samples (and shards) read failed, more than "
                f"data.max_skip_frac={self.max_skip_frac} allows; most frequent error ({n} of {self.failures}): "
                f"{kind}; first at {first}. Check data.path and the shards (a systematic error, not a few corrupt "
                "samples); data.max_skip_frac=1 never stops")
