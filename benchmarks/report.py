"""Turns bench.py's results into Markdown tables and checks them against the performance targets.

Targets (the performance issues): cnnjax's training throughput >= 1.0x PyTorch eager on every
model; the cifar_resnet18 train step compiles in <= 10 s cold and <= 2 s with a warm persistent
cache (trace + lower + compile); feeding batches from host memory keeps >= 95% of the throughput
on a batch already on the device; and, in the steps alternated in one process, cnnjax's train
step >= 1.25x PyTorch's fastest configuration of the same precision (float32: eager or
channels_last; bfloat16: channels_last + autocast).
"""

from __future__ import annotations


def _get(node, *path):
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node


def _ratio(a, b):
  return round(a / b, 2) if a and b else None


def _inv(value):
  return 1.0 / value if value else None


def _fmt(value, spec=',.0f'):
  if value is None:
    return '–'
  return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def _error(m: dict, key: str) -> str | None:
  return _get(m, key, 'error')


# The interleaved part's configurations: cnnjax's default, and PyTorch's, per precision.
CNNJAX_DEFAULT = 'cnnjax {}, oneDNN + Winograd convolutions'
PYTORCH = {'float32': ('PyTorch eager (NCHW) float32', 'PyTorch channels_last float32',
                       'PyTorch channels_last float32, 1 thread'),
           'bfloat16': ('PyTorch channels_last + autocast bfloat16',)}


def interleaved_rows(results: dict) -> list[dict]:
  """Per model and precision: cnnjax's images/s, PyTorch's fastest (which, images/s), the ratio,
  and the train step's GFLOP/s (6 x forward MACs per image) beside the matmul peak."""
  rows = []
  for name, r in results.get('interleaved', {}).items():
    for precision, configs in PYTORCH.items():
      ours = r.get(CNNJAX_DEFAULT.format(precision))
      theirs = {c: r[c] for c in configs if r.get(c)}
      if not ours or not theirs:
        continue
      fastest = max(theirs, key=theirs.get)
      rows.append({'model': name, 'precision': precision, 'cnnjax': ours, 'pytorch': fastest,
                   'pytorch_images_per_s': theirs[fastest],
                   'ratio': _ratio(ours, theirs[fastest]),
                   'gflops': round(ours * r['train_gflop_per_image'], 1),
                   'matmul_peak_gflops': r.get('matmul_peak_gflops'),
                   'isa_peak_gflops': r.get('isa_peak_gflops'),
                   'load': r.get('load_average')})
  return rows


def targets(results: dict) -> dict:
  out = {}
  for name, m in results.get('models', {}).items():
    jax_train = _get(m, 'jax', 'train', 'images_per_s')
    eager = _get(m, 'torch', 'eager', 'train', 'images_per_s')
    ratio = _ratio(jax_train, eager)
    out[f'{name}: train >= 1.0x PyTorch eager'] = {'value': ratio,
                                                    'met': None if ratio is None else ratio >= 1.0}
    fed = _ratio(_get(m, 'jax', 'train_host_fed', 'images_per_s'),
                 _get(m, 'jax', 'train_loop_device', 'images_per_s'))
    out[f'{name}: host-fed >= 95% of device batch'] = {'value': fed,
                                                        'met': None if fed is None else fed >= 0.95}
  for row in interleaved_rows(results):
    out[f"{row['model']}: {row['precision']} train >= 1.25x PyTorch's fastest, one process"] = {
        'value': row['ratio'], 'met': row['ratio'] >= 1.25}
  m = results.get('models', {}).get('cifar_resnet18')
  if m:
    cold = _get(m, 'jax_cold', 'compile_train', 'total_s')
    warm = _get(m, 'jax', 'compile_train', 'total_s')
    out['cifar_resnet18: compile cold <= 10 s'] = {'value': cold,
                                                   'met': None if cold is None else cold <= 10}
    out['cifar_resnet18: compile warm <= 2 s'] = {'value': warm,
                                                  'met': None if warm is None else warm <= 2}
  return out


def markdown(results: dict) -> str:
  cfg = results.get('config', {})
  models = results.get('models', {})
  parts = []
  defaults = any('jax_xla_defaults' in m for m in models.values())
  header = ['model', 'params', 'cnnjax', 'PyTorch eager', 'PyTorch channels_last',
            'cnnjax / eager', 'cnnjax / channels_last']
  if defaults:
    header.append('JAX, XLA default flags')
  rows = []
  for name, m in models.items():
    j = _get(m, 'jax', 'train', 'images_per_s')
    e = _get(m, 'torch', 'eager', 'train', 'images_per_s')
    c = _get(m, 'torch', 'channels_last', 'train', 'images_per_s')
    best = lambda *path: _get(m, *path, 'train', 'best_step_ms')
    row = [name, _fmt(_get(m, 'jax', 'params')), _fmt(j) if j else f'error: {_error(m, "jax")}',
           _fmt(e), _fmt(c),
           f'{_fmt(_ratio(j, e), ".2f")} ({_fmt(_ratio(best("torch", "eager"), best("jax")), ".2f")})',
           f'{_fmt(_ratio(j, c), ".2f")} ({_fmt(_ratio(best("torch", "channels_last"), best("jax")), ".2f")})']
    if defaults:
      row.append(_fmt(_get(m, 'jax_xla_defaults', 'train', 'images_per_s')))
    rows.append(row)
  loads = [l for m in models.values() for l in [_get(m, 'jax', 'load_average_before')] if l]
  busy = f'; 1-min load average during the runs: {", ".join(str(l[0]) for l in loads)}' if loads else ''
  parts.append(f'### Training throughput (images/s, batch {cfg.get("batch")}, '
               f'{cfg.get("dtype")}; median step after warm-up; ratios: median (best step)'
               f'{busy})\n\n' + _table(header, rows))

  rows = []
  for name, m in models.items():
    j = _get(m, 'jax', 'eval', 'images_per_s')
    e = _get(m, 'torch', 'eager', 'eval', 'images_per_s')
    c = _get(m, 'torch', 'channels_last', 'eval', 'images_per_s')
    rows.append([name, _fmt(j), _fmt(e), _fmt(c), _fmt(_ratio(j, e), '.2f'),
                 _fmt(_ratio(j, c), '.2f')])
  parts.append('### Evaluation throughput (images/s)\n\n' + _table(
      ['model', 'cnnjax', 'PyTorch eager', 'PyTorch channels_last', 'cnnjax / eager',
       'cnnjax / channels_last'], rows))

  rows = []
  for name, m in models.items():
    def both(which, step):
      node = _get(m, which, f'compile_{step}')
      return f'{node["total_s"]:.1f} ({node["lower_s"]:.1f} + {node["compile_s"]:.1f})' if node else '–'
    rows.append([name, both('jax_cold', 'train'), both('jax', 'train'), both('jax_cold', 'eval'),
                 both('jax', 'eval')])
  parts.append('### Compile time (s: total = trace+lower + compile)\n\n' + _table(
      ['model', 'train step, cold', 'train step, warm cache', 'eval step, cold',
       'eval step, warm cache'], rows))

  rows = []
  for name, m in models.items():
    fed = _get(m, 'jax', 'train_host_fed', 'images_per_s')
    dev = _get(m, 'jax', 'train_loop_device', 'images_per_s')
    # best windows: the fastest window of each loop (ratio of step times, inverted)
    fed_best = _inv(_get(m, 'jax', 'train_host_fed', 'best_step_ms'))
    dev_best = _inv(_get(m, 'jax', 'train_loop_device', 'best_step_ms'))
    rows.append([name, _fmt(_get(m, 'jax', 'peak_rss_mb')),
                 _fmt(_get(m, 'jax', 'xla_memory_train', 'temp_mb'), ',.1f'),
                 _fmt(_get(m, 'torch', 'eager', 'peak_rss_mb')),
                 _fmt(_get(m, 'torch', 'channels_last', 'peak_rss_mb')),
                 _fmt(dev), _fmt(fed),
                 f"{_fmt(_ratio(fed, dev), '.2f')} ({_fmt(_ratio(fed_best, dev_best), '.2f')})"])
  parts.append('### Memory (peak RSS while training, MiB) and input feeding (train images/s in '
               'the runner\'s loop: no host sync per step; host / device: median (best window))\n\n'
               + _table(['model', 'cnnjax RSS', 'XLA temp buffers', 'PyTorch eager RSS',
                         'PyTorch channels_last RSS', 'device batch', 'host batches',
                         'host / device'], rows))

  rows = interleaved_rows(results)
  if rows:
    parts.append(
        f'### Train steps alternated in one process (images/s, batch {cfg.get("batch")}, median of '
        'the rounds; GFLOP/s = 6 x forward MACs per image x images/s (Winograd counted as the direct '
        'convolution it replaces), beside the best float32 matmul on these cores and the '
        "instruction set's nominal peak)\n\n" + _table(
            ['model', 'precision', 'cnnjax', "PyTorch's fastest", 'cnnjax / PyTorch',
             'cnnjax GFLOP/s', 'matmul GFLOP/s', 'ISA peak GFLOP/s', '1-min load'],
            [[r['model'], r['precision'], _fmt(r['cnnjax'], ',.1f'),
              f"{_fmt(r['pytorch_images_per_s'], ',.1f')} ({r['pytorch'].replace('PyTorch ', '')})",
              _fmt(r['ratio'], '.2f'), _fmt(r['gflops'], ',.1f'),
              _fmt(r['matmul_peak_gflops'], ',.1f'), _fmt(r['isa_peak_gflops'], ',.1f'),
              ' -> '.join(str(l[0]) for l in r['load'] or [])] for r in rows]))

  dvc = results.get('dense_vs_conv')
  if dvc:
    jx, th = dvc.get('jax', {}), dvc.get('torch', {})
    rows = []
    for size, layers in (jx.get('sizes') or th.get('sizes') or {}).items():
      for kind, spec in layers.items():
        def ms(src, what):
          return _fmt(_get(src, 'sizes', size, kind, what, 'step_ms'), '.2f')
        rows.append([size, kind, _fmt(spec['params']), _fmt(spec['weights_per_neuron']),
                     _fmt(spec['macs_per_image']), ms(jx, 'forward'), ms(jx, 'forward_backward'),
                     ms(th, 'forward'), ms(th, 'forward_backward')])
    units = jx.get('units', th.get('units'))
    batch = jx.get('batch', th.get('batch'))
    parts.append(f'### Dense vs convolution ({units} neurons / 5x5 filters, batch {batch}; ms per '
                 'batch)\n\n' + _table(
                     ['input', 'layer', 'params', 'weights per neuron', 'MACs per image',
                      'JAX fwd', 'JAX fwd+bwd', 'PyTorch fwd', 'PyTorch fwd+bwd'], rows))

  t = results.get('targets', {})
  if t:
    mark = {True: 'met', False: 'NOT met', None: 'not measured'}
    parts.append('### Targets\n\n' + _table(
        ['target', 'measured', 'status'],
        [[k, _fmt(v['value'], '.2f'), mark[v['met']]] for k, v in t.items()]))
  return '\n\n'.join(parts)
