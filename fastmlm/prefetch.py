"""Making training batches ahead, on a background thread, so a step does not wait for its data.

    with Prefetcher(stream, depth=2) as batches:
        batch = next(batches)        # made while the previous step ran

The thread fills a queue of at most ``depth`` batches (tokenising, packing, masking:
numpy and Rust code that mostly runs outside the GIL). An error in it is raised by the
``next()`` that would have received the batch. The thread is a daemon and :meth:`close`
stops it (a blocked ``put`` gives up within 0.1 s), so Ctrl-C and the end of a run never
hang on it. ``position``, ``epoch_batches`` and ``efficiency`` describe the batches
*handed out*, not the ones made ahead, so a checkpoint saves where training is.
"""
from __future__ import annotations

import queue
import threading


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class Prefetcher:
    """An iterator over ``stream``'s batches, made up to ``depth`` ahead (module docstring).

    ``stream`` is a fastmlm.data.BatchStream or fastmlm.shard_stream.ShardStream (its
    ``position`` at the start, ``epoch_batches`` and ``collator`` are read).
    """

    def __init__(self, stream, depth: int = 2):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        self.stream, self.start, self.handed_out = stream, stream.position, 0
        self.real_tokens, self.slots = 0, 0
        self.replays = getattr(stream, "replays", True)
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="fastmlm-prefetch", daemon=True)
        self._started = False

    # what the training loop reads, for the batches it has received
    @property
    def position(self) -> int:
        return self.start + self.handed_out

    @property
    def epoch_batches(self):
        return self.stream.epoch_batches  # the same for every epoch, so knowing it early is harmless

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.slots if self.slots else 0.0

    def _produce(self) -> None:
        try:
            for batch in self.stream:
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self._stop.is_set():  # the thread is gone: waiting on the queue would hang forever
            raise ValueError("next() on a closed Prefetcher; make a new one from the stream's position")
        if not self._started:
            self._started = True
            self._thread.start()
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # a later next() ends too, instead of waiting forever
            raise StopIteration
        if isinstance(item, _Failed):
            self._queue.put(item)
            raise item.error
        self.handed_out += 1
        self.real_tokens += item.n_tokens
        self.slots += self.stream.collator.batch_size * self.stream.collator.seq_len
        return item

    def close(self) -> None:
        """Stop the thread and drop the batches made ahead (idempotent)."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._started:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
