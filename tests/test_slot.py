import asyncio

import numpy as np

from streamguard.ingest.slot import FrameSlot
from streamguard.types import SampledFrame


def frame(pts: float) -> SampledFrame:
    return SampledFrame("s", pts, pts, np.zeros((2, 2, 3), np.uint8))


def test_latest_wins_and_drops_are_counted():
    async def main():
        slot = FrameSlot()
        for pts in (1.0, 2.0, 3.0):
            slot.put(frame(pts))
        got = await slot.get()
        assert got.pts_s == 3.0 and slot.dropped == 2 and slot.put_count == 3
        waiter = asyncio.create_task(slot.get())
        await asyncio.sleep(0)
        assert not waiter.done()
        slot.put(frame(4.0))
        assert (await waiter).pts_s == 4.0
        slot.close()
        assert await slot.get() is None
        slot.put(frame(5.0))  # after close: ignored
        assert await slot.get() is None

    asyncio.run(main())
