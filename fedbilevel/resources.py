"""What a process uses: read by the server (per round) and by every client (per train reply)."""

from __future__ import annotations

from fedbilevel import protocol


def process_memory_mb() -> dict[str, float]:
    """This process's resident memory now and at its peak, in MB (``{}`` where unreadable).

    Recorded per round for the server (``server_memory_mb``) and with every client's train
    reply (``rss-mb``, ``peak-rss-mb``), so memory growth over a run shows in results.json.
    """
    fields = {"VmRSS": protocol.RSS_MB, "VmHWM": protocol.PEAK_RSS_MB}  # Linux: current and high-water mark
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) / 1024  # kB
    return out
