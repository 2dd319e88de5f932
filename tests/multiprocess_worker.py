"""One process of tests/test_multiprocess.py: `bana ARGS... --then ARGS...` runs the two command
lines through the CLI's main in one interpreter, which saves a JAX start-up per stage. Launched with
the cluster variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) it is one host
of a multi-process job, exactly as `bana` is."""

import sys

from bana_jax import cli


def main(argv: list[str]) -> int:
    commands, current = [], []
    for arg in argv:
        if arg == "--then":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for args in commands:
        status = cli.main(args)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
