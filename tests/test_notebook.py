"""The Colab TPU notebook runs top to bottom (nbclient, CPU, small-steps mode on mnist5k) on 8
simulated devices, as many as a Colab TPU v2-8 has cores, with its own batch sizes."""
from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / 'notebooks' / 'colab_tpu.ipynb'


@pytest.fixture(scope='module')
def executed(tmp_path_factory, monkeypatch_module):
  monkeypatch_module.setenv('CNNJAX_NOTEBOOK_SMALL', '1')
  monkeypatch_module.setenv('JAX_PLATFORMS', 'cpu')
  flags = os.environ.get('XLA_FLAGS', '')
  monkeypatch_module.setenv('XLA_FLAGS', f'{flags} --xla_force_host_platform_device_count=8')
  monkeypatch_module.setenv('PYTHONPATH', str(ROOT))  # the kernel imports this checkout
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cwd = tmp_path_factory.mktemp('notebook')
  NotebookClient(notebook, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(cwd)}}).execute()
  return notebook


@pytest.fixture(scope='module')
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as mp:
    yield mp


def _text(cell) -> str:
  parts = []
  for out in cell.get('outputs', []):
    parts.append(out.get('text', ''))
    parts.append(out.get('data', {}).get('text/plain', ''))
  return ''.join(parts)


def test_notebook_trains_plots_and_steps_by_hand(executed):
  code = [c for c in executed.cells if c.cell_type == 'code']
  assert all(c.get('execution_count') for c in code), 'every code cell ran'
  text = '\n'.join(_text(c) for c in code)
  assert '8 CPU device(s)' in text and 'on 1 host(s)' in text
  assert 'global batch 32, 4 per device' in text
  assert 'finished step 20' in text
  assert "'steps': 20" in text
  images = [o for c in code for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(images) == 4  # curves, feature maps, filters, confusion matrix
  assert 'step 2: loss' in text
  assert "layer1_0 output for one test image: (1, 28, 28, 4)" in text


def test_parameters_cell_is_tagged_for_papermill():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [c for c in notebook.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1 and 'SMALL' in tagged[0].source
  assert all(not c.get('outputs') for c in notebook.cells if c.cell_type == 'code'), \
      'commit the notebook without outputs'
