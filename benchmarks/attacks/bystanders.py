"""A pair of bystander clients chatting; measure latency and failures."""

import asyncio
import time

import websockets


async def bystanders(port, duration, interval=0.05):
    url = f"ws://127.0.0.1:{port}/ws"
    lat, errors = [], []
    try:
        a = await asyncio.wait_for(websockets.connect(url, max_size=None), 5)
        b = await asyncio.wait_for(websockets.connect(url, max_size=None), 5)
    except Exception as e:
        return {"error": f"connect: {e!r}"}
    sent = {}

    async def reader():
        try:
            async for m in b:
                tag = m.split(": ", 1)[1] if ": " in m else m
                if tag in sent:
                    lat.append(time.monotonic() - sent.pop(tag))
        except Exception as e:
            errors.append(f"b: {e!r}")

    async def drain_a():
        try:
            async for m in a:
                pass
        except Exception as e:
            errors.append(f"a recv: {e!r}")

    rt = asyncio.create_task(reader())
    dt = asyncio.create_task(drain_a())
    end = time.monotonic() + duration
    i = 0
    while time.monotonic() < end:
        tag = f"by{i}"
        sent[tag] = time.monotonic()
        i += 1
        try:
            await a.send(tag)
        except Exception as e:
            errors.append(f"a send: {e!r}")
            break
        await asyncio.sleep(interval)
    await asyncio.sleep(0.5)
    lost = len(sent)
    for w in (a, b):
        try:
            await asyncio.wait_for(w.close(), 2)
        except Exception:
            pass
    rt.cancel()
    dt.cancel()
    lat.sort()
    q = lambda p: (
        round(lat[min(int(p * len(lat)), len(lat) - 1)] * 1000, 1) if lat else None
    )
    return {
        "sent": i,
        "lost": lost,
        "p50ms": q(0.5),
        "p99ms": q(0.99),
        "max": q(1.0),
        "errors": errors[:3],
    }
