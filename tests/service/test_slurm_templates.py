"""The Slurm files a site admin gets (deploy/slurm), checked without a cluster: every batch
template asks for host memory (many sites refuse jobs without a request), the sample
autoscale.toml has a `default` pool (evaluations and pool-less jobs count toward it; without it
they never get a pilot), no pool's extra sbatch arguments ask for memory in a form sbatch
refuses next to the templates' --mem-per-gpu, and `lathe slurm autoscale` accepts the sample.

The templates themselves run on a real Slurm in test_slurm_autoscale.py (the pilot) and the
data-parallel tests (the gang worker and the multi-node trainer).
"""

from __future__ import annotations

import re
import subprocess
import tomllib

import pytest

from lathe_service import ROOT, find_lathe_bin

SLURM = ROOT / "deploy" / "slurm"
SAMPLE = SLURM / "autoscale.toml"
# sbatch: "--mem, --mem-per-cpu, and --mem-per-gpu are mutually exclusive" (also between a
# template's #SBATCH line and the command line).
OTHER_MEMORY_FLAGS = re.compile(r"^--mem(-per-cpu)?(=|$)")


@pytest.fixture(autouse=True)
def clean_slate():
    """Replaces the suite's fixture of this name: nothing here needs a controller."""
    yield


def sbatch_directives(path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_every_template_asks_for_memory_per_gpu():
    templates = sorted(SLURM.glob("*.sbatch"))
    assert len(templates) >= 4, templates
    for template in templates:
        directives = sbatch_directives(template)
        memory = [d for d in directives if d.startswith("--mem")]
        assert len(memory) == 1 and re.fullmatch(r"--mem-per-gpu=\d+[KMGT]?", memory[0]), \
            f"{template.name}: asks for {memory or 'no memory'}; one #SBATCH --mem-per-gpu=… line expected"
        assert any(d.startswith("--gres=gpu") for d in directives), f"{template.name}: --mem-per-gpu without GPUs"


def test_the_sample_autoscaler_config_has_a_default_pool_and_memory_sbatch_accepts():
    config = tomllib.loads(SAMPLE.read_text())
    pools = config["pools"]
    assert "default" in pools, "no `default` pool: evaluations and jobs without a pool would never get a pilot"
    for name, pool in pools.items():
        refused = [a for a in pool.get("extra_sbatch_args", []) if OTHER_MEMORY_FLAGS.match(a)]
        assert not refused, f"pool {name}: {refused} next to the template's --mem-per-gpu makes sbatch refuse the job"
    assert (SLURM / config["template"]).is_file(), config["template"]


def test_lathe_slurm_autoscale_accepts_the_sample(tmp_path):
    """The autoscaler reads the sample (unknown keys are errors there) and gets as far as asking
    the controller, which does not exist here: the config itself passed."""
    config = tmp_path / "autoscale.toml"
    text = re.sub(r'(?m)^controller = ".*"$', 'controller = "http://127.0.0.1:9"', SAMPLE.read_text())
    text = re.sub(r'(?m)^template = "(.*)"$', lambda m: f'template = "{SLURM / m.group(1)}"', text)
    config.write_text(text)
    env = {"PATH": "/usr/bin:/bin", "LATHE_ADMIN_TOKEN": "not-used"}
    result = subprocess.run([find_lathe_bin(), "slurm", "autoscale", "--config", str(config), "--once"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0 and "the controller at http://127.0.0.1:9" in result.stderr, \
        f"the sample config did not load:\n{result.stderr}"
