import subprocess
import sys
import zipfile

import pytest

from shared_ris import RecipeError, available_recipes, load_recipe
from shared_ris.config import recipe_from_dict


def test_packaged_recipes_resolve_by_name():
    assert {"base", "large", "tiny"} <= set(available_recipes())
    base = load_recipe("base")
    assert base.model.image_size == 480 and base.model.fpn.stages == [3, 6, 9, 12]
    assert base.train.betas == [0.9, 0.98] and base.train.weight_decay == 5e-4 and base.train.lr == 1e-4
    assert base.train.batch_size == 14 and base.train.epochs == 35 and base.train.grad_clip == 1.0
    assert base.model.encoder.drop_path_rate == 0.1 and base.model.threshold == 0.35
    assert (base.loss.bce_weight, base.loss.dice_weight) == (2.0, 0.5)
    large = load_recipe("large")
    assert (large.model.encoder.embed_dim, large.model.encoder.depth) == (1024, 24)
    for name in available_recipes():
        r = load_recipe(name)
        assert r.train.max_steps == 0 and r.train.epochs > 0 and r.train.batch_size > 0


def test_recipe_by_path_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(load_recipe("tiny").to_yaml())
    recipe = load_recipe(str(path))
    assert recipe.model.image_size == 128
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_overrides_are_typed():
    r = load_recipe("base", ["model.fpn.stages=[6,12]", "model.decoder.shared_layers=0", "train.lr=3e-4",
                             "train.warmup_steps=100", "model.fpn.stages=[]"])
    assert r.model.fpn.stages == [] and r.model.decoder.shared_layers == 0 and r.train.lr == 3e-4
    assert isinstance(load_recipe("base", ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("override,message", [
    ("model.fpn.stage=[3]", "unknown recipe key model.fpn.stage; valid keys: .*model.fpn.stages"),
    ("model.fpn.stages=abc", "model.fpn.stages must be a list"),
    ("train.batch_size=1.5", "train.batch_size must be int"),
    ("train.epochs", "must look like key=value"),
    ("model.fpn=3", "is a section"),
    ("model.fpn.stages=[13]", "distinct layers in 1..12"),
    ("data.text_field=words", "data.text_field must be"),
])
def test_bad_overrides_give_one_line(override, message):
    with pytest.raises(RecipeError, match=message) as exc:
        load_recipe("base", [override])
    assert "\n" not in str(exc.value)


def test_unknown_recipe_and_bad_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(str(tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(RecipeError, match="unknown recipe key model.widht"):
        load_recipe(str(bad))


@pytest.mark.slow
def test_recipes_resolve_from_a_regular_wheel_install(tmp_path):
    """A non-editable install must carry the YAML recipes inside the package."""
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(repo)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shared_ris-*.whl")
    assert "shared_ris/recipes/base.yaml" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import shared_ris; r = shared_ris.load_recipe('base'); print(shared_ris.__file__, r.model.image_size)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         check=True, capture_output=True, text=True).stdout
    assert str(target) in out and out.strip().endswith("480")
