"""gpu_check: one command that verifies and measures a CUDA machine, with no Bazel.

From the repository root of a checkout, on a CUDA machine, with the Python that has
JAX (its CUDA plugin), flax, pytest and matplotlib:

    python3 tools/gpu_check --out DIR [--wheels DIR] [--budget SECONDS]
    python3 tools/gpu_check --out DIR --dry-run     # the same steps in their CPU form
    python3 tools/gpu_check/wheels.py [DIR]         # fetch the wheels --wheels installs

Steps, in order, each under a time limit that is printed and enforced by subprocess
timeouts, so a slow step cannot eat the time of the others (the time a step leaves
unused goes to the next one); ``--budget`` (default 450 s) is shared out among them:

  1. versions   the GPU, driver and CUDA (nvidia-smi), Python and the packages;
  2. wheels     ``pip install --no-index --no-deps --target`` of ``--wheels/*.whl`` into a
                temporary directory, put on PYTHONPATH for the child processes only: the
                machine's own packages are never touched, and a wheel that would replace
                jax, jaxlib, triton, numpy or flax fails the step;
  3. tests      ``python -m pytest tests examples -m "gpu or backends or large"``: the
                backend tests compiled and every gpu-marked test (every backend
                bit-identical to xla, gradients, nnx.jit, the
                out-of-range modes, a table past 2**31 elements), with a summary line;
  4. sanitizer  the out-of-range and large-table tests under
                ``compute-sanitizer --tool memcheck``, with its error count;
  5. benchmark  ``python -m bench.lookup --grid gpu --passes fwd,bwd --choose`` with the
                copy ceiling, writing CSV, JSON and PNG into ``--out``;
  6. summary    ``DIR/summary.md``, ready to paste into docs/benchmarks.md.

Files written to ``--out``: summary.md, gpu_check.log (every step's full output),
tests.xml and sanitizer.xml (JUnit), benchmark.csv, benchmark.json, benchmark.png, and
sass_report.md: what XLA compiles each kernel to for an H100 (tools/sass_report.py;
COMPILED, NOT MEASURED), printed in the summary beside the measured figures.

The exit status is 1 when any step fails, 2 for bad arguments. On a GPU a step fails
when what it checks does not hold or could not be checked (JAX sees no GPU, a gpu test
fails or is skipped, a kernel is not bit-identical or cannot run, memcheck reports an
error); a step is skipped, with the reason, only where there is nothing to check
(no --wheels given, no compute-sanitizer installed). ``--dry-run`` runs every step in
its CPU form (gpu tests collected and skipped, the sanitizer's test selection collected
but not run, a tiny benchmark grid) and says for each what it left out and why.

The check itself uses only the standard library (with bench/options.py and
tests/gpu_selection.py, which import no JAX), so it reports a JAX that does not start;
the child processes use the interpreter that runs it.

Modules: ``running`` (child processes under a time limit), ``steps`` (the six steps),
``summary`` (reading results, writing summary.md), ``cli`` (arguments and the run),
``wheels`` (fetching and vetting the extra wheels).
"""
