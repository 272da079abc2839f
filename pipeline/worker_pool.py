"""Long-lived stateful actors fed with Ray Data block references: the driver coordinates, never carries data.

Why not Ray Data's own actor pool: a map_batches actor cannot be asked to hand over its state when the stream
ends, and why not `streaming_split`: a consumer that dies leaves its split's coordinator waiting. Here the driver
pulls block *references* from the decode pipeline (`iter_internal_ref_bundles`: the blocks stay in the object
store) and hands each to an actor with room (at most `in_flight` calls each). An actor that dies (its process
or its node) is dropped, not restarted in place: the pool shrinks, so the CPUs left on the surviving nodes stay
free for reading and decoding, and whatever the dead actor held since its last flush is redone by the next pass
(pipeline.scan.flushes). A replacement is started only when no actor is left. When nothing moves for `stall_seconds`
(no block arrives, no call returns), the pass fails with a message saying what is pending instead of hanging.

The same pool runs work that is not a Ray Data stream (`map`): render tasks, dissect's probe batches. The lost
actor, replacement and stall rules are the ones above; a lost actor's calls go back to the front of the queue.
Stateless work (render: files are written by the driver) needs no more. Stateful workers (dissect: statistics
accumulated in the actor until `gather` collects them) are mapped with `replay=True`: the pool remembers which
items each actor finished since its state was last gathered, and redoes them on another actor when it is lost,
so a lost actor changes nothing in the result. Ctrl-C (KeyboardInterrupt) leaves `map` and `run` at once; the
caller's `shutdown` (in a finally) ends every actor.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)


class PoolStalled(RuntimeError):
    """No progress for the stall timeout; the message says what is pending."""


class WorkerStartFailed(RuntimeError):
    """A model worker's constructor raised (a model that cannot be built there, no GPU where one was asked for):
    starting another would fail the same way, so the run stops at once with the worker's own error."""


def _start_failure(error: BaseException) -> WorkerStartFailed | None:
    """The error of an actor whose constructor raised, as one line; None for any other loss (a killed process,
    a lost node), which a new worker can recover from."""
    if not getattr(error, "actor_init_failed", False):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Ray's message ends with the constructor's traceback; its last line is "module.Error: message".
    cause = lines[-1] if lines else type(error).__name__
    return WorkerStartFailed(f"a model worker could not start: {cause}")


@dataclass
class PassOutcome:
    images: int = 0  # images the workers processed in this pass (whether or not their flush was committed)
    lost_calls: int = 0  # calls that failed because an actor or a block was lost
    dead_actors: int = 0

    @property
    def lossless(self) -> bool:
        return self.lost_calls == 0 and self.dead_actors == 0


@dataclass
class _Actor:
    handle: Any
    name: str
    calls: dict = field(default_factory=dict)  # ObjectRef -> description (`map`: the item and when it was sent)
    done: list = field(default_factory=list)  # `map(replay=True)`: items finished since the last `gather`


_END = object()


def _feed(bundles: Iterator, out: queue.Queue, stop: threading.Event) -> None:
    """Pull block references from Ray Data in a thread, so a stalled pipeline cannot block the driver's loop."""
    try:
        for bundle in bundles:
            slices = getattr(bundle, "slices", None) or [None] * len(bundle.block_refs)
            for ref, piece in zip(bundle.block_refs, slices):
                while not stop.is_set():
                    try:
                        out.put((ref, piece), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        out.put(_END)
    except BaseException as error:  # noqa: BLE001 - handed to the driver's loop, which re-raises it
        out.put(error)


def _LOST_ACTOR_ERRORS() -> tuple:  # noqa: N802 - a constant that needs Ray, imported only when used
    """Ray's errors for a call whose actor died or cannot be reached."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (ActorDiedError, ActorUnavailableError, RayActorError)


def _is_system_failure(error: BaseException) -> bool:
    """Ray's errors for lost nodes, workers and objects (not a bug in our code, not bad input)."""
    from ray import exceptions

    kinds = tuple(
        getattr(exceptions, name)
        for name in (
            "ObjectLostError",
            "OwnerDiedError",
            "NodeDiedError",
            "WorkerCrashedError",
            "RaySystemError",
            "ActorDiedError",
            "ObjectReconstructionFailedError",
        )
        if hasattr(exceptions, name)
    )
    return isinstance(error, kinds) or isinstance(getattr(error, "cause", None), kinds)


class WorkerPool:
    """A pool of actors made by `make_actor(index)`; see the module doc."""

    def __init__(
        self,
        make_actor: Callable[[int], Any],
        size: int,
        in_flight: int = 2,
        stall_seconds: float = 600.0,
        describe_pending: Callable[[], str] | None = None,
        starve_seconds: float = 15.0,
        input_cpus: float = 0.25,
    ):
        self.make_actor = make_actor
        self.in_flight = in_flight
        self.stall_seconds = stall_seconds
        self.starve_seconds = starve_seconds
        self.input_cpus = input_cpus
        self.describe_pending = describe_pending or (lambda: "")
        self.started = 0
        self.actors: list[_Actor] = [self._new_actor() for _ in range(size)]

    def _new_actor(self) -> _Actor:
        index = self.started
        self.started += 1
        return _Actor(self.make_actor(index), f"worker {index}")

    def _drop(self, actor: _Actor, outcome: PassOutcome, error: BaseException) -> None:
        import ray

        logger.warning(
            "%s lost (%s); the pool goes on with %d, its unflushed images are redone",
            actor.name,
            type(error).__name__,
            len(self.actors) - 1,
        )
        outcome.dead_actors += 1
        outcome.lost_calls += len(actor.calls)
        actor.calls.clear()
        self.actors.remove(actor)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _wait(self, outcome: PassOutcome, on_result: Callable[[Any], None], timeout: float) -> bool:
        """Collect finished calls; True if any returned."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, ObjectLostError, RayActorError

        pending = {ref: actor for actor in self.actors for ref in actor.calls}
        if not pending:
            return False
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout, fetch_local=True)
        for ref in ready:
            actor = pending[ref]
            if actor not in self.actors:
                continue
            actor.calls.pop(ref, None)
            try:
                result = ray.get(ref)
            except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
                failure = _start_failure(error)
                if failure is not None:
                    raise failure from error
                self._drop(actor, outcome, error)
                continue
            except ObjectLostError as error:  # the block's node died before the actor read it
                logger.warning("a block was lost (%s); its images are redone", type(error).__name__)
                outcome.lost_calls += 1
                continue
            on_result(result)
        return bool(ready)

    def _stalled(self, since: float, what: str = "batches") -> None:
        if time.time() - since > self.stall_seconds:
            calls = sum(len(a.calls) for a in self.actors)
            raise PoolStalled(
                f"no progress for {self.stall_seconds:.0f} s: {len(self.actors)} model workers alive, "
                f"{calls} {what} in their hands; {self.describe_pending()}"
            )

    def _starving(self, idle_since: float) -> bool:
        """Idle actors and no input for a while, with less free CPU than one read/decode task needs anywhere:
        after a node was lost, the surviving actors may hold every CPU left."""
        import ray

        if len(self.actors) < 2 or time.time() - idle_since < self.starve_seconds:
            return False
        return ray.available_resources().get("CPU", 0.0) < self.input_cpus

    def _retire(self, actor: _Actor, flush_method: str, on_flush: Callable[[Any], None], outcome: PassOutcome) -> None:
        """Hand over the actor's state (committed by `on_flush`), then end it: its CPU goes to reading."""
        import ray

        logger.warning(
            "%s retired: the CPUs left cannot run the read and decode tasks beside %d model workers",
            actor.name,
            len(self.actors),
        )
        try:
            on_flush(ray.get(getattr(actor.handle, flush_method).remote(), timeout=self.stall_seconds))
        except Exception as error:  # noqa: BLE001 - lost with its state: the next pass redoes its images
            logger.warning("%s could not flush (%s)", actor.name, type(error).__name__)
            outcome.lost_calls += 1
        self.actors.remove(actor)
        ray.kill(actor.handle, no_restart=True)

    def run(
        self,
        bundles: Iterator,
        method: str,
        on_result: Callable[[Any], None],
        flush_method: str = "flush",
        on_flush: Callable[[Any], None] = lambda _: None,
    ) -> PassOutcome:
        """Send every block of `bundles` to `actor.<method>(block, start, end)`; `on_result` gets each result.
        An actor retired mid-pass hands its state to `on_flush` through `flush_method` first."""
        outcome = PassOutcome()
        blocks: queue.Queue = queue.Queue(maxsize=max(2, len(self.actors) * self.in_flight))
        stop = threading.Event()
        feeder = threading.Thread(target=_feed, args=(bundles, blocks, stop), daemon=True, name="block-feeder")
        feeder.start()
        progress = idle_since = time.time()
        exhausted = False
        try:
            while True:
                while not exhausted:
                    free = [a for a in self.actors if len(a.calls) < self.in_flight]
                    if not free:
                        break
                    try:
                        item = blocks.get(timeout=0.05 if any(a.calls for a in self.actors) else 0.5)
                    except queue.Empty:
                        break
                    if item is _END:
                        exhausted = True
                        break
                    if isinstance(item, BaseException):
                        if not _is_system_failure(item):
                            raise item
                        # A node died under the read/decode pipeline: end this pass; the next one re-reads
                        # whatever is not covered.
                        logger.warning("the input pipeline failed (%s); this pass ends early", type(item).__name__)
                        outcome.lost_calls += 1
                        exhausted = True
                        break
                    progress = time.time()
                    ref, piece = item
                    actor = min(free, key=lambda a: len(a.calls))
                    start, end = (piece.start_offset, piece.end_offset) if piece is not None else (None, None)
                    actor.calls[getattr(actor.handle, method).remote(ref, start, end)] = ref
                if not self.actors:
                    logger.warning("every model worker was lost; starting a new one")
                    self.actors.append(self._new_actor())
                if self._wait(outcome, on_result, timeout=0.2):
                    progress = time.time()
                elif exhausted and not any(a.calls for a in self.actors):
                    return outcome
                if any(a.calls for a in self.actors) or exhausted:
                    idle_since = time.time()
                elif self._starving(max(idle_since, progress)):
                    self._retire(self.actors[-1], flush_method, on_flush, outcome)
                    idle_since = progress = time.time()
                self._stalled(progress)
        finally:
            stop.set()

    def map(
        self,
        items: Iterable,
        method: str,
        on_result: Callable[[Any, Any, float], None],
        prepare: Callable[[Any, deque], Any] | None = None,
        replay: bool = False,
        what: str = "tasks",
    ) -> PassOutcome:
        """Call `actor.<method>(prepare(item, queue))` for every item (at most `in_flight` calls per actor);
        `on_result(item, result, seconds)` gets each result in completion order. `prepare` (default: the item
        itself) sees the queue still to send, so it may read ahead (render fetches a layer's images at once).
        A lost actor is dropped and its calls (with `replay`, also the items it finished since the last
        `gather`) are sent again; a new actor is started when none is left; PoolStalled when no call returns
        for `stall_seconds`. A task's own error (RayTaskError) is raised as it is."""
        import ray

        outcome = PassOutcome()
        # A deque given is the queue itself, so `prepare` sees everything still to send.
        queue: deque = items if isinstance(items, deque) else deque()
        source = iter(()) if queue is items else iter(items)
        progress = time.time()

        def next_item() -> tuple[bool, Any]:
            if queue:
                return True, queue.popleft()
            for item in source:
                return True, item
            return False, None

        while True:
            if not self.actors:
                logger.warning("every worker was lost; starting a new one")
                self.actors.append(self._new_actor())
            for actor in sorted(self.actors, key=lambda a: len(a.calls)):
                while len(actor.calls) < self.in_flight:
                    found, item = next_item()
                    if not found:
                        break
                    argument = prepare(item, queue) if prepare is not None else item
                    actor.calls[getattr(actor.handle, method).remote(argument)] = (item, time.time())
            pending = {ref: actor for actor in self.actors for ref in actor.calls}
            if not pending:
                return outcome
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(5.0, self.stall_seconds))
            if not ready:
                self._stalled(progress, what)
                continue
            actor = pending[ready[0]]
            item, sent = actor.calls.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except _LOST_ACTOR_ERRORS() as error:
                failure = _start_failure(error)
                if failure is not None:
                    raise failure from error
                again = [item] + [call[0] for call in actor.calls.values()] + (actor.done if replay else [])
                self._drop(actor, outcome, error)
                queue.extendleft(reversed(again))
                continue
            progress = time.time()
            if replay:
                actor.done.append(item)
            on_result(item, result, progress - sent)

    def gather(
        self, method: str, redo: str | None = None, on_redo: Callable[[Any, Any, float], None] | None = None
    ) -> list:
        """`method()` of every actor (their accumulated state). An actor lost before answering has its finished
        items (`map(replay=True)`) redone by the others through `redo`, and the gathering starts again: every
        item counted exactly once."""
        import ray

        results: list = []
        while True:
            lost: list = []
            refs = [(getattr(actor.handle, method).remote(), actor) for actor in self.actors]
            for ref, actor in refs:
                try:
                    results.append(ray.get(ref, timeout=self.stall_seconds))
                    actor.done.clear()
                except _LOST_ACTOR_ERRORS() as error:
                    lost.extend(actor.done)
                    self._drop(actor, PassOutcome(), error)
                except ray.exceptions.GetTimeoutError:
                    raise PoolStalled(f"no answer to {method} for {self.stall_seconds:.0f} s") from None
            if not lost:
                return results
            if redo is None:
                raise RuntimeError(f"a worker was lost before {method} and nothing can redo its work")
            # The answers so far hold their actors' own items (and reset them): only the lost actor's items are
            # redone, and the next round gathers just those.
            self.map(lost, redo, on_redo or (lambda *_: None), replay=True)

    def call_all(self, method: str, on_result: Callable[[Any], None], outcome: PassOutcome) -> None:
        """Call `method()` on every live actor (the end-of-pass flush) and collect the results."""
        for actor in list(self.actors):
            actor.calls[getattr(actor.handle, method).remote()] = method
        progress = time.time()
        while any(a.calls for a in self.actors):
            if self._wait(outcome, on_result, timeout=0.5):
                progress = time.time()
            self._stalled(progress)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
