"""Config overrides (incl. model options from the command line) and which errors count as the user's."""
import pathlib
import subprocess
import sys

import pytest

from cnnjax import config as config_lib
from cnnjax import errors

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_model_options_are_set_with_their_types_after_the_model_is_chosen():
  # model.name comes after the option on the command line: options are checked against resnet18.
  config = config_lib.load_experiment('cifar_resnet', [
      '--config.model.kwargs.num_filters=16', '--config.model.name=resnet18',
      '--config.model.kwargs.stage_sizes=1,1,1,1', '--config.model.kwargs.stem=cifar',
      '--config.model.kwargs.zero_init_residual=true'])
  assert config.model.name == 'resnet18'
  assert config.model.kwargs.to_dict() == {
      'num_filters': 16, 'stage_sizes': (1, 1, 1, 1), 'stem': 'cifar', 'zero_init_residual': True}
  from cnnjax import models
  model = models.get_model(config.model.name, num_classes=10, **config.model.kwargs.to_dict())
  assert (model.num_filters, model.stage_sizes, model.stem) == (16, (1, 1, 1, 1), 'cifar')


@pytest.mark.parametrize('name', ['convnext_tiny', 'efficientnet_b0', 'efficientnet_v2_s'])
def test_stochastic_depth_is_a_model_option_from_the_command_line(name):
  """Drop path (cnnjax.blocks.drop_path) for the models that have it, by their option."""
  config = config_lib.load_experiment('quickstart', [
      f'model.name={name}', 'model.kwargs.stochastic_depth_prob=0.25'])
  from cnnjax import models
  model = models.get_model(name, num_classes=10, **config.model.kwargs.to_dict())
  assert model.stochastic_depth_prob == 0.25


@pytest.mark.parametrize('override, message', [
    ('model.kwargs.width=3', "model 'small_resnet' has no option 'width'"),
    ('model.kwargs.num_classes=3', 'it comes from the data'),
    ('model.kwargs.num_filters=abc', "config key 'model.kwargs.num_filters' expects an int"),
    ('model.kwargs.zero_init_residual=maybe', 'expects a bool'),
])
def test_bad_model_options_name_the_key(override, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.load_experiment('cifar_resnet', [override])


def test_only_cnnjax_errors_are_treated_as_user_errors(tmp_path):
  """A ValueError from a bug keeps its traceback (exit 1); a CnnjaxError is one line (exit 2)."""
  for kind, code in (('ValueError', 1), ('FileNotFoundError', 1), ('errors.DataError', 2)):
    script = tmp_path / 'probe.py'
    script.write_text(
        'import sys\n'
        f'sys.path.insert(0, {str(ROOT)!r})\n'
        'import run\n'
        'from cnnjax import errors, runner\n'
        'def broken(config, workdir):\n'
        f'  raise {kind}("an internal bug")\n'
        'runner.run = broken\n'
        'sys.exit(run.main(["--workdir", sys.argv[1]]))\n')
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'run')], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, (kind, proc.stderr)
    if code == 2:
      assert proc.stderr.strip() == 'error: an internal bug'
    else:
      assert 'Traceback' in proc.stderr and 'an internal bug' in proc.stderr


def test_the_workdir_placeholder_in_a_data_name_is_the_runs_workdir(tmp_path):
  """folder_digits writes its folder into the workdir; run.py resolves the name before any mode
  (training, --visualize, --export), so all of them read the same folder."""
  config = config_lib.load_experiment('folder_digits')
  assert config.data.name == 'folder:<workdir>/digits'
  config_lib.resolve_workdir(config, tmp_path / 'run')
  assert config.data.name == f'folder:{tmp_path}/run/digits'
  config_lib.resolve_workdir(config, tmp_path / 'elsewhere')  # a resolved (or the user's own) name stays
  assert config.data.name == f'folder:{tmp_path}/run/digits'
