"""The batcher against a real ONNX Runtime session: a tiny model built here (mean pixel → logit), no mocks of ORT."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from streamguard.inference.batcher import Batcher, BatcherClosed
from streamguard.inference.card import ModelCard, Preprocess
from streamguard.inference.onnx import OnnxClassifier

SIZE = 32


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> OnnxClassifier:
    """logit = 8 · (mean of the [0, 1] pixels − 0.5): brighter crops are "faker", each crop its own score."""
    path = Path(tmp_path_factory.mktemp("model")) / "mean.onnx"
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Sub", ["m", "half"], ["c"]),
        helper.make_node("Mul", ["c", "gain"], ["logit"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mean_logit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N"])],
        initializer=[
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [8.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    card = ModelCard(
        name="mean-test",
        architecture="mean pixel",
        preprocess=Preprocess(input_size=SIZE, layout="NCHW"),
        output="logit_fake",
        source="built by tests/test_batcher.py",
    )
    return OnnxClassifier(path, card, threads=1)


def expected(crop: np.ndarray) -> float:
    return 1.0 / (1.0 + math.exp(-8.0 * (crop.astype(np.float64).mean() / 255.0 - 0.5)))


def crops(n: int, seed: int = 0) -> np.ndarray:
    """Crops of distinct brightness, so a score handed to the wrong caller shows."""
    rng = np.random.default_rng(seed)
    base = np.linspace(10, 245, n)[:, None, None, None]
    return np.clip(base + rng.normal(0, 5, (n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


class Recording:
    """The real classifier, with a record of each predict call's batch size (and an optional delay or failure)."""

    def __init__(self, inner: OnnxClassifier, delay_s: float = 0.0, fail_calls: tuple[int, ...] = ()):
        self.inner, self.card, self.backend = inner, inner.card, inner.backend
        self.delay_s, self.fail_calls = delay_s, fail_calls
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    @property
    def input_size(self) -> int:
        return self.inner.input_size

    def predict(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            call = len(self.sizes)
            self.sizes.append(len(batch))
        self.threads.add(threading.current_thread().name)
        if self.delay_s:
            time.sleep(self.delay_s)  # blocks the worker thread, as a long GPU/CPU inference would
        if call in self.fail_calls:
            raise RuntimeError(f"boom in call {call}")
        return self.inner.predict(batch)


def test_tiny_model_is_a_real_onnx_call(classifier):
    x = crops(3)
    p = classifier.predict(x)
    assert p.shape == (3,) and p.dtype == np.float32
    assert p == pytest.approx([expected(c) for c in x], abs=1e-5)
    assert p[0] < 0.1 and p[2] > 0.9


def test_cpu_calls_of_a_few_faces_give_the_one_call_scores_in_order(classifier):
    """A batch runs as session.run calls of `call_batch` faces (smaller calls stay in the CPU caches: README); the
    scores are the one-call scores, in the crops' order, whatever the remainder."""
    x = crops(11)
    whole = OnnxClassifier(classifier.path, classifier.card, threads=1, call_batch=64).predict(x)
    for call_batch in (1, 4, 11):
        chunked = OnnxClassifier(classifier.path, classifier.card, threads=1, call_batch=call_batch)
        sizes: list[int] = []
        run = chunked._run
        chunked._run = lambda c, run=run, sizes=sizes: (sizes.append(len(c)), run(c))[1]  # type: ignore[method-assign]
        got = chunked.predict(x)
        assert got == pytest.approx(whole, abs=1e-6) and got == pytest.approx([expected(c) for c in x], abs=1e-5)
        assert sizes == [call_batch] * (11 // call_batch) + ([11 % call_batch] if 11 % call_batch else [])
    with pytest.raises(ValueError, match="call_batch"):
        OnnxClassifier(classifier.path, classifier.card, call_batch=0)


def test_concurrent_callers_share_batches_and_get_their_own_scores(classifier):
    rec = Recording(classifier)
    x = crops(50)

    async def main() -> list[float]:
        async with Batcher(rec, max_batch=16, max_wait_ms=20) as b:

            async def caller(k: int) -> list[float]:  # 5 callers (streams), 10 crops each in flight at once
                return await asyncio.gather(*(b.score(x[i]) for i in range(k, 50, 5)))

            per_caller = await asyncio.gather(*(caller(k) for k in range(5)))
            assert b.stats.crops == 50 and b.stats.batches == len(rec.sizes)
        out = [0.0] * 50
        for k, scores in enumerate(per_caller):
            for j, s in enumerate(scores):
                out[k + 5 * j] = s
        return out

    scores = asyncio.run(main())
    assert sum(rec.sizes) == 50
    assert len(rec.sizes) <= math.ceil(50 / 16) + 1
    assert max(rec.sizes) <= 16
    single = [float(classifier.predict(c[None])[0]) for c in x]
    assert scores == pytest.approx(single, abs=1e-6)
    assert scores == pytest.approx([expected(c) for c in x], abs=1e-5)
    assert all(t.startswith("streamguard-infer") for t in rec.threads)  # off the loop thread


def test_score_many_matches_one_predict(classifier):
    x = crops(40, seed=1)

    async def main() -> np.ndarray:
        async with Batcher(classifier, max_batch=16) as b:
            return await b.score_many(x)

    p = asyncio.run(main())
    assert p.shape == (40,) and p.dtype == np.float32
    assert p == pytest.approx(classifier.predict(x), abs=1e-6)


def test_a_lone_request_is_flushed_after_max_wait(classifier):
    rec = Recording(classifier)

    async def main(max_wait_ms: float) -> float:
        async with Batcher(rec, max_batch=16, max_wait_ms=max_wait_ms) as b:
            t0 = time.perf_counter()
            p = await b.score(crops(1)[0])
            assert p == pytest.approx(expected(crops(1)[0]), abs=1e-5)
            return time.perf_counter() - t0

    elapsed = asyncio.run(main(50))
    assert 0.04 <= elapsed < 1.0  # waited for company, then went alone
    assert asyncio.run(main(0)) < 0.5
    assert rec.sizes == [1, 1]


def test_a_full_batch_leaves_without_waiting(classifier):
    rec = Recording(classifier)

    async def main() -> float:
        async with Batcher(rec, max_batch=8, max_wait_ms=10_000) as b:
            t0 = time.perf_counter()
            await b.score_many(crops(8))
            return time.perf_counter() - t0

    assert asyncio.run(main()) < 2.0
    assert rec.sizes == [8]


def test_the_loop_stays_responsive_during_a_slow_predict(classifier):
    rec = Recording(classifier, delay_s=0.2)

    async def main() -> tuple[float, int]:
        lag, ticks, stop = 0.0, 0, asyncio.Event()

        async def heartbeat() -> None:
            nonlocal lag, ticks
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                t = loop.time()
                await asyncio.sleep(0.005)
                lag = max(lag, loop.time() - t - 0.005)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        async with Batcher(rec, max_batch=4, max_wait_ms=5) as b:
            p = await b.score_many(crops(12))
        stop.set()
        await beat
        assert p == pytest.approx([expected(c) for c in crops(12)], abs=1e-5)
        return lag, ticks

    lag, ticks = asyncio.run(main())
    assert rec.sizes == [4, 4, 4]  # one worker: the rest queue up while a batch runs
    assert ticks > 50  # ~0.6 s of inference; a blocked loop would tick ~once per batch
    # A predict on the loop would stall it >= 200 ms; the bound leaves room for a CPU shared with other jobs.
    assert lag < 0.1, f"event loop blocked for {lag * 1000:.0f} ms"


def test_two_workers_run_batches_concurrently(classifier):
    rec = Recording(classifier, delay_s=0.3)

    async def main() -> float:
        async with Batcher(rec, max_batch=4, max_wait_ms=5, workers=2) as b:
            t0 = time.perf_counter()
            await b.score_many(crops(8))
            return time.perf_counter() - t0

    elapsed = asyncio.run(main())
    assert rec.sizes == [4, 4]
    assert elapsed < 0.55  # one worker would take >= 0.6 s
    assert len(rec.threads) == 2


def test_a_failing_predict_fails_only_its_batch(classifier):
    rec = Recording(classifier, fail_calls=(0,))
    x = crops(8)

    async def main():
        async with Batcher(rec, max_batch=4, max_wait_ms=20) as b:
            results = await asyncio.gather(*(b.score(c) for c in x), return_exceptions=True)
            again = await b.score(x[0])  # still serving
            return results, again, b.stats

    results, again, stats = asyncio.run(main())
    assert rec.sizes == [4, 4, 1]
    assert all(isinstance(r, RuntimeError) and "boom" in str(r) for r in results[:4])
    assert results[4:] == pytest.approx([expected(c) for c in x[4:]], abs=1e-5)
    assert again == pytest.approx(expected(x[0]), abs=1e-5)
    assert (stats.batches, stats.crops, stats.failed_batches, stats.failed_crops) == (2, 5, 1, 4)


def test_a_malformed_crop_fails_only_its_caller(classifier):
    rec = Recording(classifier)
    x = crops(3)

    async def main():
        async with Batcher(rec, max_batch=4, max_wait_ms=20) as b:
            return await asyncio.gather(
                b.score(x[0]),
                b.score(np.zeros((SIZE, SIZE, 3), np.float32)),  # wrong dtype
                b.score(np.zeros((SIZE + 1, SIZE, 3), np.uint8)),  # wrong size
                b.score(x[1]),
                return_exceptions=True,
            )

    ok0, bad_dtype, bad_size, ok1 = asyncio.run(main())
    assert isinstance(bad_dtype, ValueError) and isinstance(bad_size, ValueError)
    assert (ok0, ok1) == pytest.approx((expected(x[0]), expected(x[1])), abs=1e-5)
    assert rec.sizes == [2]


def test_a_cancelled_caller_costs_no_inference(classifier):
    rec = Recording(classifier)
    x = crops(2)

    async def main() -> float:
        async with Batcher(rec, max_batch=16, max_wait_ms=50) as b:
            gone = asyncio.create_task(b.score(x[0]))
            kept = asyncio.create_task(b.score(x[1]))
            await asyncio.sleep(0.01)
            gone.cancel()
            return await kept

    assert asyncio.run(main()) == pytest.approx(expected(x[1]), abs=1e-5)
    assert rec.sizes == [1]


def test_close_finishes_in_flight_and_fails_pending(classifier):
    rec = Recording(classifier, delay_s=0.2)
    x = crops(6)

    async def main():
        b = Batcher(rec, max_batch=2, max_wait_ms=1)
        await b.start()
        tasks = [asyncio.create_task(b.score(c)) for c in x]
        await asyncio.sleep(0.05)  # the first batch is in the worker, the rest wait for it
        assert b.pending == 4
        await b.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(BatcherClosed):
            await b.score(x[0])
        await b.close()  # idempotent
        return results

    results = asyncio.run(main())
    assert results[:2] == pytest.approx([expected(c) for c in x[:2]], abs=1e-5)
    assert all(isinstance(r, BatcherClosed) and "closed before" in str(r) for r in results[2:])
    assert rec.sizes == [2]


def test_stats_and_the_on_batch_hook(classifier):
    seen: list[tuple[int, float, str]] = []

    def hook(size: int, seconds: float, backend: str) -> None:
        seen.append((size, seconds, backend))
        raise RuntimeError("a broken metrics hook")  # must not break scoring

    async def main():
        async with Batcher(classifier, max_batch=8, max_wait_ms=5, on_batch=hook) as b:
            p = await b.score_many(crops(20))
            return p, b.stats

    p, stats = asyncio.run(main())
    assert len(p) == 20
    assert sum(size for size, _, _ in seen) == 20 and all(backend == "onnxruntime" for _, _, backend in seen)
    assert stats.crops == 20 and stats.batches == len(seen)
    assert sum(size * n for size, n in stats.batch_sizes.items()) == 20 and max(stats.batch_sizes) <= 8
    assert stats.inference_seconds == pytest.approx(sum(s for _, s, _ in seen)) and stats.inference_seconds > 0


def test_rejects_bad_settings(classifier):
    for kw in ({"max_batch": 0}, {"max_wait_ms": -1}, {"workers": 0}):
        with pytest.raises(ValueError):
            Batcher(classifier, **kw)
