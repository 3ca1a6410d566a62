"""benchmarks/bench.py --smoke runs end to end (JAX, and PyTorch when installed) and writes its JSON."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from cnnjax import runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_consistent_json(tmp_path):
  out = tmp_path / 'bench.json'
  # conftest's configure_cpu() put cnnjax's flags into XLA_FLAGS; the benchmark compares
  # cnnjax's flags with XLA's defaults, so it must start from a clean XLA_FLAGS.
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  proc = subprocess.run([sys.executable, 'benchmarks/bench.py', '--smoke', '--json', str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '### Training throughput' in proc.stdout
  r = json.loads(out.read_text())
  m = r['models']['lenet5']
  jax_run = m['jax']
  assert jax_run['params'] == 61_706
  assert jax_run['train']['images_per_s'] > 0 and jax_run['eval']['images_per_s'] > 0
  assert jax_run['train_host_fed']['images_per_s'] > 0
  assert jax_run['peak_rss_mb'] > 0
  # The persistent compilation cache is written on CPU: the second process loads the step.
  cold, warm = m['jax_cold']['compile_train']['compile_s'], jax_run['compile_train']['compile_s']
  assert warm < cold, (cold, warm)   # loose: a timing, measured while CI runs other work
  # cnnjax's XLA:CPU flags for this jaxlib (none for one nobody measured) change speed, not
  # results: same losses as XLA's defaults.
  defaults = m['jax_xla_defaults']
  assert jax_run['xla_flags'].split() == [f'--{k}={v}' for k, v in runtime.cpu_flags().items()]
  assert defaults['xla_flags'] == ''
  for a, b in zip(jax_run['losses'], defaults['losses']):
    assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (jax_run['losses'], defaults['losses'])
  sizes = r['dense_vs_conv']['jax']['sizes']
  assert sizes['200x200x3']['dense']['weights_per_neuron'] == 120_000
  assert sizes['200x200x3']['conv']['params'] == sizes['32x32x3']['conv']['params']
  assert 'lenet5: train >= 1.0x PyTorch eager' in r['targets']
  if importlib.util.find_spec('torch') is not None:
    torch_run = m['torch']
    assert torch_run['eager']['params'] == jax_run['params']  # the same network in both
    assert torch_run['channels_last']['train']['images_per_s'] > 0
    assert r['dense_vs_conv']['torch']['sizes']['32x32x3']['dense']['params'] == 196_672
    # the speed targets: every configuration alternated in one process, both precisions
    steps = r['interleaved']['lenet5']
    for config in ('cnnjax float32, oneDNN + Winograd convolutions', 'PyTorch eager (NCHW) float32',
                   'cnnjax bfloat16, oneDNN + Winograd convolutions',
                   'PyTorch channels_last + autocast bfloat16'):
      assert steps[config] > 0, config
    assert steps['train_gflop_per_image'] > 0 and steps['matmul_peak_gflops'] > 0
    assert "lenet5: bfloat16 train >= 1.25x PyTorch's fastest, one process" in r['targets']
    assert '### Train steps alternated in one process' in proc.stdout
