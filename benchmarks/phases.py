"""Where one trace's wall time goes, phase by phase (a diagnostic, not a workload).

For the tiny MLP and gpt2-tiny, each repetition times a plain forward of the wrapped
model, then one `save 1` trace split into: `model.trace(x)`, `__enter__`, recording
(`.output ... .save()`), and `__exit__` (the run, with the forward inside it) minus
the plain forward just timed. Both outputs are freed after the timed phases.
Medians in µs.

    .venv/bin/python benchmarks/phases.py [--reps N]
"""

import argparse
import statistics
import time

import torch

from common import fi_wrap, gpt2, hidden, tiny_mlp

PHASES = ("trace()", "__enter__", "recording", "__exit__ - forward")


def phases(model, inputs, read, reps):
    """{phase: median µs} over `reps` traces (after 100 warm-up ones)."""
    clock = time.perf_counter_ns
    module = model._model
    samples = {name: [] for name in PHASES}
    for i in range(reps + 100):
        a = clock()
        plain = module(inputs)
        b = clock()
        tracer = model.trace(inputs)
        t1 = clock()
        tracer.__enter__()
        t2 = clock()
        read(model).save()
        t3 = clock()
        tracer.__exit__(None, None, None)
        t4 = clock()
        del plain, tracer  # both outputs freed outside the timed phases
        if i >= 100:
            for name, ns in zip(PHASES, (t1 - b, t2 - t1, t3 - t2, (t4 - t3) - (b - a))):
                samples[name].append(ns / 1000)
    return {name: statistics.median(v) for name, v in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    reps = parser.parse_args().reps
    net = gpt2("gpt2-tiny")
    cases = {
        "tiny MLP": (fi_wrap(tiny_mlp()), torch.rand(1, 5), lambda m: m.layer1.output),
        "gpt2-tiny": (fi_wrap(net), torch.randint(0, 1000, (1, 16)),
                      lambda m: hidden(m.transformer.h[0].output, net.block_tuple)),
    }
    print("| model | " + " | ".join(PHASES) + " |")
    print("| --- |" + " ---: |" * len(PHASES))
    for label, (model, inputs, read) in cases.items():
        result = phases(model, inputs, read, reps)
        print(f"| {label} | " + " | ".join(f"{result[name]:.1f} µs" for name in PHASES) + " |")


if __name__ == "__main__":
    main()
