"""Several ``lorakit train`` commands in one torchrun process group (the distributed parity tests start the ranks
once for all of them): ``torchrun ... tests/train/distributed_worker.py COMMANDS.json``, a JSON list of argv
lists; the first command that fails ends the rank with its status."""

from __future__ import annotations

import json
import sys

from lorakit.cli.main import main
from lorakit.train.distributed import start_process_group, stop_process_group

if __name__ == "__main__":
    start_process_group()
    finished = False
    try:
        for argv in json.loads(open(sys.argv[1]).read()):
            print("command:", " ".join(argv[:2]), argv[argv.index("--out") + 1], file=sys.stderr, flush=True)
            status = main(argv)
            if status:
                raise SystemExit(status)
        finished = True
        print("all commands finished", file=sys.stderr, flush=True)
    finally:
        stop_process_group(finished=finished)
