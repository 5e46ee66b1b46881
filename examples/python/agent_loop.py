#!/usr/bin/env python3
"""An agent-style loop in a sandbox: write a program, run it with its output streamed as it
comes, read its result back, and let the sandbox go when done.

    ./x python                       # builds and installs the wheel (and tests it)
    ~/.cache/msb-vmm/py-test/bin/python examples/python/agent_loop.py

Needs the guest kernel, msb-init and default root that `./x setup` caches, and a /dev/kvm
that boots Linux (elsewhere: `./x l2 -- ~/.cache/msb-vmm/py-test/bin/python
examples/python/agent_loop.py`)."""

import sys

from msb_vmm import CommandError, Network, Sandbox, Stderr, Stdout

# What a model might have written: a program that works on a file and reports as it goes.
PROGRAM = '''
import json, time
words = open("/work/input.txt").read().split()
counts = {}
for i, w in enumerate(words):
    counts[w] = counts.get(w, 0) + 1
    if i % 3 == 0:
        print(f"processed {i + 1} words", flush=True)
        time.sleep(0.05)
json.dump(counts, open("/work/result.json", "w"), sort_keys=True)
print("done")
'''


def main() -> int:
    # No network at all: the code the model wrote has no business reaching out.
    with Sandbox.create(memory_mib=256, network=Network(preset="none"), workdir="/work") as sb:
        sb.files.write("/work/input.txt", "the quick brown fox jumps over the lazy dog the end\n")
        sb.files.write("/work/task.py", PROGRAM)
        with sb.stream(["python3", "task.py"]) as proc:
            for event in proc:
                if isinstance(event, Stdout):
                    sys.stdout.write("[sandbox] " + event.text)
                elif isinstance(event, Stderr):
                    sys.stderr.write("[sandbox stderr] " + event.text)
            result = proc.exited
        if result is None or result.exit_code != 0:
            print("the program failed: %r" % (result,), file=sys.stderr)
            return 1
        print("result:", sb.files.read_text("/work/result.json"))
        # A command that fails, caught as the agent would, with its output.
        try:
            sb.run("python3 -c 'import nonexistent_module'", check=True)
        except CommandError as e:
            print("caught:", str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
