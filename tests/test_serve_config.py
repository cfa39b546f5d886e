"""The deployment entry points without starting anything: the Serve config file Serve
itself would accept, the builder it names, and `raysvc serve` refusing bad flags early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_is_accepted_by_serve_and_builds_the_app():
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))
    (app,) = config.applications
    builder = import_attr(app.import_path)
    built = call_user_app_builder_with_args_if_necessary(builder, app.args)
    assert isinstance(built, Application)


def test_serve_args_refuse_unknown_and_bad_values():
    from pydantic import ValidationError

    from raysvc.serve.app import build_app
    from raysvc.serve.args import ServeArgs

    with pytest.raises(ValidationError, match="num_wrokers"):
        ServeArgs(num_wrokers=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        build_app({"engine": {"max_num_seqs": 0}})
    with pytest.raises(ValueError, match="unknown engine argument"):
        build_app({"engine": {"max_seqs": 4}})


def test_cli_serve_rejects_bad_flags_before_starting_ray():
    out = subprocess.run([sys.executable, "-m", "raysvc.cli", "serve", "--max-num-seqs", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "max_num_seqs" in out.stderr
    help_out = subprocess.run([sys.executable, "-m", "raysvc.cli", "serve", "--help"],
                              capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "--num-workers" in help_out.stdout


def test_draft_pool_args():
    from pydantic import ValidationError

    from raysvc.serve.args import ServeArgs

    a = ServeArgs(draft_workers=2)  # implies a draft-model speculative config
    assert a.engine["speculative_config"] == {"method": "draft_model"}
    assert ServeArgs(draft_workers=1, engine={"speculative_config": {
        "method": "draft_model", "num_speculative_tokens": 3}}).engine[
        "speculative_config"]["num_speculative_tokens"] == 3
    with pytest.raises(ValidationError, match="draft_workers"):
        ServeArgs(draft_workers=1, engine={"speculative_config": {"method": "ngram"}})
    with pytest.raises(ValidationError, match="draft_workers"):
        ServeArgs(draft_workers=-1)
    assert ServeArgs().worker_spec().draft_actors == []


@pytest.mark.parametrize("flags, field", [
    (["--speculative-config", "{method: ngram"], "--speculative-config"),
    (["--speculative-config", '{"method": "medusa"}'], "speculative_config"),
    (["--speculative-config", '{"method": "ngram"}', "--draft-workers", "1"], "draft_workers"),
])
def test_cli_serve_rejects_bad_speculation_flags(flags, field):
    out = subprocess.run([sys.executable, "-m", "raysvc.cli", "serve", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and field in out.stderr, out.stderr


def test_worker_range_defaults_and_errors():
    from pydantic import ValidationError

    from raysvc.serve.args import ServeArgs

    def rng(**kw):
        a = ServeArgs(**kw)
        return a.num_workers, a.min_workers, a.max_workers

    assert rng() == (1, 1, 1)  # one fixed worker, as before
    assert rng(num_workers=3) == (3, 3, 3)  # a fixed pool of 3
    assert rng(max_workers=4) == (1, 1, 4)  # elastic from 1
    assert rng(min_workers=2, max_workers=4) == (2, 2, 4)
    assert rng(num_workers=3, min_workers=2, max_workers=4) == (3, 2, 4)
    assert rng(min_workers=2) == (2, 2, 2)
    for kw, field in [({"min_workers": 3, "max_workers": 2}, "min_workers"),
                      ({"num_workers": 5, "max_workers": 4}, "num_workers"),
                      ({"num_workers": 1, "min_workers": 2, "max_workers": 4}, "num_workers"),
                      ({"min_workers": 0}, "min_workers"),
                      ({"max_workers": "many"}, "max_workers"),
                      ({"worker_autoscaling": {"upscale_delay_s": -1}}, "upscale_delay_s"),
                      ({"worker_autoscaling": {"scale_up_delay": 1}}, "scale_up_delay"),
                      ({"worker_autoscaling": {"downscale_delay_s": "5m"}}, "downscale_delay_s"),
                      ({"worker_autoscaling": {"migrate_on_drain": "yes"}}, "migrate_on_drain"),
                      ({"ingress_autoscaling": {"max_replica": 4}}, "max_replica"),
                      ({"ingress_autoscaling": {"min_replicas": 3, "max_replicas": 2}},
                       "ingress_autoscaling")]:
        with pytest.raises(ValidationError, match=field):
            ServeArgs(**kw)


@pytest.mark.parametrize("flags, message", [
    (["--min-workers", "3", "--max-workers", "2"], "min_workers"),
    (["--num-workers", "9", "--max-workers", "4"], "num_workers"),
    (["--worker-autoscaling", "{upscale_delay_s: 1"], "--worker-autoscaling"),
    (["--worker-autoscaling", '{"upscale_delay_s": -1}'], "upscale_delay_s"),
    (["--worker-autoscaling", '{"bogus": 1}'], "bogus"),
    (["--lora-modules", "sql"], "--lora-modules: 'sql' is not NAME=DIR"),
    (["--lora-modules", "a=/x", "a=/y"], "'a' is given twice"),
    (["--lora-modules", "sql=/nonexistent/adapter"], "is not a directory"),
    (["--lora-modules", '{"name": "sql"}'], '{"name": NAME, "path": DIR}'),
    (["--max-loras", "0", "--enable-lora"], "max_loras"),
    (["--allow-runtime-lora-updating"], "allow_runtime_lora_updating"),
    (["--placement", '{"pull_weight": x'], "--placement: not JSON"),
    (["--placement", '{"pull_wieght": 1}'], "pull_wieght"),
    (["--kv-offload-bytes", "-1"], "kv_offload_bytes"),
])
def test_cli_serve_refuses_bad_flags_before_starting(flags, message):
    """Scaling, LoRA and KV-fabric flags: refused before anything starts, naming the flag,
    the field or the adapter's file."""
    out = subprocess.run([sys.executable, "-m", "raysvc.cli", "serve", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_serve_config_file_with_a_bad_range_is_refused():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raysvc.serve.app import build_app

    with pytest.raises(Exception, match="min_workers"):
        call_user_app_builder_with_args_if_necessary(build_app,
                                                     {"min_workers": 4, "max_workers": 2})
