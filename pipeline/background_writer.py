"""BackgroundWriter: the capture's bounded write queue and the one thread that encodes and writes shards.

Used by `pipeline.precompute`, so the teacher never waits for the disk: the queue holds at most WRITE_QUEUE_BATCHES
batches; encoding (bit packing), Arrow/Zarr writing and checksums happen on the writer thread. A writer error is
re-raised in the main thread at its next call. Each finished shard leaves its completion marker in `_progress/`.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

from .common.files import write_json_atomic
from .format import PROGRESS_DIR, ShardWriter, shard_name
from .format.encode import encode_rows
from .format.sections import Capture

WRITE_QUEUE_BATCHES = 4  # how far the teacher may run ahead of the disk


class BackgroundWriter:
    """A bounded queue and one thread that writes shards, so the teacher never waits for the disk.

    The queue holds at most WRITE_QUEUE_BATCHES batches; a writer error is re-raised in the main thread at the next put.
    """

    def __init__(self, out: Path, capture: Capture, seq_len: int, on_shard=None):
        self.out, self.capture, self.seq_len = out, capture, seq_len
        self.on_shard = on_shard  # on_shard(out, marker, files): after a shard's marker (uploads to a bucket)
        self.schema = capture.schema(seq_len)
        self.widths = {x.index: x.width for x in capture.hidden_layers}
        self.q: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _check(self):
        if self.error is not None:
            raise self.error

    def open(self, index: int, n_windows: int):
        self._check()
        self.q.put(("open", index, n_windows))

    def put(self, rows, hidden, stats):
        self._check()
        self.q.put(("rows", rows, hidden, stats))

    def close_shard(self):
        self._check()
        self.q.put(("close",))

    def join(self):
        self.q.put(("stop",))
        self.thread.join()
        self._check()

    def stop(self):
        if self.thread.is_alive():
            self.q.put(("stop",))
            self.thread.join()

    def _run(self):
        writer = None
        try:
            while True:
                item = self.q.get()
                if item[0] == "stop":
                    return
                if item[0] == "open":
                    _, index, n = item
                    writer = ShardWriter(self.out, index, self.schema, n, self.seq_len, self.widths, self.capture.batch_size,
                                         compression=self.capture.compression, trained_only=self.capture.trained_only)
                    current = index
                elif item[0] == "rows":
                    _, rows, hidden, stats = item
                    writer.write(encode_rows(rows, self.capture), hidden)
                    for name, (total, count) in stats.items():
                        writer.add_stat(name, total, count)
                elif item[0] == "close":
                    record = writer.finish()
                    marker = self.out / PROGRESS_DIR / f"shard-{shard_name(current)}.json"
                    write_json_atomic(marker, record.to_json())
                    if self.on_shard:
                        self.on_shard(self.out, marker, list(record.files))
                    writer = None
        except BaseException as e:  # surfaced in the main thread
            self.error = e
            if writer is not None:
                writer.abort()
            while True:  # keep draining so the producer never blocks on a full queue
                if self.q.get()[0] == "stop":
                    return
