"""`python -m dist_tempnet.train --config FILE [key=value ...]`: the worker loop without Ray.

A stable module path for torchrun and GPU boxes; the code is in `commands/worker.py` (entry) and
`runtime/trainer.py` (the loop).
"""

from dist_tempnet.commands.worker import main

if __name__ == "__main__":
    main()
