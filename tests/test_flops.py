"""fvcore figures against the paper's tables (within 20%) and the SDPA handle."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from shared_ris import load_recipe
from shared_ris.flops import count_flops


def near(value, target, tolerance=0.2):
    return abs(value - target) <= tolerance * target


@pytest.mark.slow
def test_base_figures_match_the_paper(tmp_path):
    out = tmp_path / "flops.json"
    result = CliRunner().invoke(app, ["flops", "--recipe", "base", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "multiply-adds" in result.output
    report = json.loads(out.read_text())
    assert (report["recipe"], report["image_size"], report["text_len"]) == ("base", 480, 20)
    c = report["components"]
    assert c["encoder"]["params"] == 221_528_064  # 221.5 M at 480
    assert near(c["encoder"]["gflops"], 94)  # ~94 GMACs with attention counted
    assert near(c["fpn"]["params"], 8e6) and near(c["fpn"]["gflops"], 9)  # Table VII(a)
    assert near(c["decoder"]["params"], 9e6) and near(c["decoder"]["gflops"], 50)  # Table V
    assert 8.5e6 <= c["decoder"]["params"] <= 9.5e6 and near(c["decoder"]["gflops"], 50, 0.03)  # with the 1×1 projection
    assert c["total"]["params"] == sum(c[k]["params"] for k in ("encoder", "fpn", "decoder"))
    assert c["total"]["gflops"] == pytest.approx(sum(c[k]["gflops"] for k in ("encoder", "fpn", "decoder")))


@pytest.mark.slow
def test_ablation_figures_match_the_paper():
    two_stages = count_flops(load_recipe("base", ["model.fpn.stages=[6,12]"]))["components"]["fpn"]
    assert near(two_stages["params"], 4e6) and near(two_stages["gflops"], 5)
    no_fusion = count_flops(load_recipe("base", ["model.decoder.shared_layers=0"]))["components"]["decoder"]
    assert near(no_fusion["params"], 5e6) and near(no_fusion["gflops"], 46, 0.03)


def test_the_projection_is_one_linear_1x1_conv_at_the_output_size():
    with_projection = count_flops(load_recipe("tiny"))["components"]["decoder"]
    without = count_flops(load_recipe("tiny", ["model.decoder.projection=false"]))["components"]["decoder"]
    tiny = load_recipe("tiny")
    dim, side = tiny.model.fpn.dim, tiny.model.image_size // 4
    assert with_projection["params"] - without["params"] == dim * dim + dim
    assert (with_projection["gflops"] - without["gflops"]) * 1e9 == pytest.approx(dim * dim * side * side)


def test_sdpa_is_counted_in_a_real_trace():
    tiny = load_recipe("tiny")
    report = count_flops(tiny)
    assert "aten::scaled_dot_product_attention" not in report["skipped_ops"]
    # Attention cost of the encoder: L layers × 2·h·N²·d with N = 65 vision + 16 text tokens.
    n, d, depth = 65 + 16, tiny.model.encoder.embed_dim, tiny.model.encoder.depth
    linear = depth * (4 * d * d + 2 * d * tiny.model.encoder.ffn_dim) * n
    assert report["components"]["encoder"]["gflops"] * 1e9 > linear + depth * 2 * n * n * d - 1


def test_cli_rejects_bad_override():
    result = CliRunner().invoke(app, ["flops", "--set", "model.fpn.stage=[3]"])
    assert result.exit_code == 2
    assert "unknown recipe key model.fpn.stage" in result.output
    assert "Traceback" not in result.output
