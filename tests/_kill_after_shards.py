"""Test-only fault injection for cache-codes: SIGKILL this process right after its N-th shard is written (as a
preempted job dies), by monkeypatching tokenizer.cache_codes.write_shard, never through a production hook.

    python tests/_kill_after_shards.py 2 --tokenizer T --data D --out O ...   # then `mgvq cache-codes` arguments
"""
import os
import signal
import sys

from tokenizer import cache_codes


def patch(n: int) -> None:
    real, done = cache_codes.write_shard, {"n": 0}

    def write_shard(*args, **kwargs):
        real(*args, **kwargs)
        done["n"] += 1
        if done["n"] >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    cache_codes.write_shard = write_shard


if __name__ == "__main__":
    patch(int(sys.argv[1]))
    sys.exit(cache_codes.main(sys.argv[2:]))
