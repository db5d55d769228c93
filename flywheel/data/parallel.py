"""Where a file's batches are built: in the ingest process alone, or shared with a helper process.

    batches(reader, parallel=True) -> Iterator[Batch]      the reader's batches, in file order

Parsing, validating and scrubbing cost about 35 µs of CPU per conversation; writing costs 5 (PostgreSQL)
to 15 (SQLite). In parallel the file is cut into chunks of `batch_rows` lines (BatchReader.part): a helper
process builds some of the chunks and this process the others (OWN_SHARE), between writing batches, so
both cores parse (a helper that parsed everything while this process only wrote set the pace alone, at
about 25,000 conversations a second at best). The batches are taken in turn, so they are written in file order: which of
two lines with the same id or content wins is the same as in one process. Each batch carries its own format
and PII counts; the ingest adds them up. A JSON array cannot be cut without parsing it from the start: it is
built in this process.

The helper runs at most a batch ahead (the pipe holds less than one, so it waits in `send` until this
process takes the batch): memory stays flat in the file size. If this process ends, the helper finds the
pipe closed and ends (a SIGKILL included: its next send fails); Ctrl-C reaches both; an error in the helper
is handed over and raised here.
"""

from __future__ import annotations

import gc
import multiprocessing
import pickle
from collections.abc import Generator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from flywheel.data.batches import Batch, BatchReader
from flywheel.errors import InfrastructureError

# How many of every `period` chunks this process builds itself, so that it and the helper take about as long:
# it also writes them all, 5 µs a conversation on PostgreSQL (one in two), 15 on SQLite (one in three). CPU
# for 200,000 conversations, bench/ingest.py: SQLite one in two 6.8 s here and 4.6 s in the helper, one in
# three 5.9 s and 5.8 s; PostgreSQL one in two 4.5 s and 4.5 s.
OWN_SHARE = {"sqlite": (1, 3), "postgresql": (1, 2)}


def batches(reader: BatchReader, parallel: bool) -> Generator[Batch]:
    """The reader's batches in file order, shared with a helper process when `parallel` (and the file can
    be cut: JSON Lines)."""
    if not parallel or not reader.shareable():
        return iter(reader)
    return _shared(reader)


def _shared(reader: BatchReader) -> Generator[Batch]:
    own_chunks, period = OWN_SHARE.get(reader.dialect, (1, 2))
    with ExitStack() as stack:
        # The helper first, so that its start (about 0.3 s of imports) overlaps this process's first chunks.
        helper = stack.enter_context(_helper(reader.part(own_chunks, period, period)))
        own = iter(reader.part(0, own_chunks, period))
        stack.callback(own.close)  # closes the file
        turns = [own] * own_chunks + [helper] * (period - own_chunks)  # who has chunk k: turns[k % period]
        while True:
            for source in turns:
                batch = next(source, None)
                if batch is None:  # no chunk k, so none after it
                    return
                yield batch


@contextmanager
def _helper(reader: BatchReader) -> Iterator[Iterator[Batch]]:
    """A helper process building `reader`'s batches, and the batches it hands over pickled through a pipe."""
    context = multiprocessing.get_context("spawn")  # no fork: the parent may hold threads and open connections
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_helper_main, args=(sender, reader), name="flywheel-ingest-parser", daemon=True)
    process.start()
    sender.close()

    def received() -> Iterator[Batch]:
        while True:
            try:
                item = pickle.loads(receiver.recv_bytes())
            except EOFError:
                process.join(timeout=5)  # for its exit code
                raise InfrastructureError(f"the ingest parser process for {reader.path} stopped (exit code {process.exitcode})") from None
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield received()
    finally:
        receiver.close()  # a helper still sending finds the pipe closed and ends
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()
            process.join()


def _helper_main(sender: Any, reader: BatchReader) -> None:
    try:
        with fewer_gc_passes():  # a spawned process starts with the default threshold: a third more CPU here
            for batch in reader:
                sender.send_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        sender.send_bytes(pickle.dumps(None))
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the ingest process is gone or stopping: nothing to hand over
    except BaseException as exc:  # handed to the ingest process, which raises it
        try:
            sender.send_bytes(pickle.dumps(exc))
        except Exception:
            sender.send_bytes(pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}")))
    finally:
        sender.close()


@contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Each line allocates a few dozen dicts and lists, none of them in a reference cycle; the default
    collector threshold (700) makes it walk the young objects every few lines, about a tenth of the ingest
    time. A higher threshold for the duration keeps collection on, just rarer."""
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
