"""A torchrun target for test_train: train_gpt.main(), each rank printing its gloo worker threads (named in /proc,
Linux) before and after it leaves the process group, and when it enters and leaves end_run."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_gpt as tg  # noqa: E402


def gloo_workers() -> int:
    return sum(Path(f"/proc/self/task/{t}/comm").read_text().startswith("pt_gloo_runloop")
               for t in os.listdir("/proc/self/task"))


def main() -> None:
    leave, end = tg.leave_process_group, tg.end_run

    def counted_leave(d):
        before = gloo_workers()
        leave(d)
        print(f"probe_leave rank:{d.rank} gloo_workers_before:{before} after:{gloo_workers()}", flush=True)

    def timed_end(d):
        entered = time.time()
        end(d)
        print(f"probe_end rank:{d.rank} entered:{entered:.6f} returned:{time.time():.6f}", flush=True)

    tg.leave_process_group, tg.end_run = counted_leave, timed_end
    tg.main()


if __name__ == "__main__":
    main()
