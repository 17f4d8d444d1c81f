"""Recipe validation and recipe loading: every bad input gets a one-line error naming the file."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from normscope import NormscopeError
from normscope.probe import Recipe, load_recipe

GOOD = """
import torch
from torch import nn
from normscope.probe import Recipe

def recipe():
    m = nn.Linear(3, 2)
    return Recipe(m, [(torch.randn(4, 3), torch.randint(0, 2, (4,)))], nn.functional.cross_entropy, steps=3)

def other():
    r = recipe()
    r.steps = 5
    return r

not_callable = 3

def wrong():
    return {"model": 1}

def boom():
    raise ValueError("no data here")
"""


def write(tmp_path, text, name="r.py"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_load_path_default_function(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert isinstance(r, Recipe) and r.steps == 3 and r.name == "r"


def test_load_path_with_function(tmp_path):
    p = write(tmp_path, GOOD)
    assert load_recipe(f"{p}:other").steps == 5


def test_load_module_function(tmp_path, monkeypatch):
    write(tmp_path, GOOD, "my_recipes_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = load_recipe("my_recipes_mod:other")
    assert r.steps == 5 and r.name == "my_recipes_mod:other"
    sys.modules.pop("my_recipes_mod", None)


def test_recipe_file_can_import_its_neighbours(tmp_path):
    write(tmp_path, "SIZE = 7\n", "helper_for_recipe_x.py")
    p = write(tmp_path, GOOD.replace("nn.Linear(3, 2)", "nn.Linear(3, __import__('helper_for_recipe_x').SIZE)"))
    assert load_recipe(p).model.out_features == 7
    assert str(tmp_path) not in sys.path  # the folder is only on the path while importing
    sys.modules.pop("helper_for_recipe_x", None)


@pytest.mark.parametrize("spec,match", [
    ("{d}/missing.py", r"recipe file .*missing\.py does not exist"),
    ("{p}:nope", r"r\.py has no function nope\(\)"),
    ("{p}:not_callable", r"not_callable is a int, not a function"),
    ("{p}:wrong", r"wrong\(\) returned dict, expected a normscope\.Recipe"),
    ("{p}:boom", r"boom\(\) raised ValueError: no data here"),
    ("no_such_module_xyz:recipe", r"recipe module no_such_module_xyz could not be imported \(ModuleNotFoundError"),
    ("justaname", r"neither a \.py file nor 'module:function'"),
])  # fmt: skip
def test_load_errors_are_one_line(tmp_path, spec, match):
    p = write(tmp_path, GOOD)
    with pytest.raises(NormscopeError, match=match) as e:
        load_recipe(spec.format(d=tmp_path, p=p))
    assert "\n" not in str(e.value)


def test_file_raising_on_import(tmp_path):
    p = write(tmp_path, "import torch\nx = 1 / 0\n")
    with pytest.raises(NormscopeError, match=r"raised ZeroDivisionError on import: division by zero") as e:
        load_recipe(p)
    assert str(p) in str(e.value)


def test_file_without_recipe_function(tmp_path):
    p = write(tmp_path, "x = 1\n")
    with pytest.raises(NormscopeError, match=r"has no function recipe\(\)"):
        load_recipe(p)


def test_recipe_validation():
    m, data = nn.Linear(2, 2), [(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(NormscopeError, match="one-shot iterator"):
        Recipe(m, (b for b in data), nn.functional.cross_entropy)
    with pytest.raises(NormscopeError, match="must be a torch.nn.Module"):
        Recipe("m", data, nn.functional.cross_entropy)
    with pytest.raises(NormscopeError, match="steps must be a whole number"):
        Recipe(m, data, nn.functional.cross_entropy, steps=0)
    with pytest.raises(NormscopeError, match="loss_fn must be callable"):
        Recipe(m, data, "ce")
    with pytest.raises(NormscopeError, match="Recipe.optimizer must be"):
        Recipe(m, data, nn.functional.cross_entropy, optimizer="adam")
    with pytest.raises(NormscopeError, match="iterable of"):
        Recipe(m, 3, nn.functional.cross_entropy)


def test_default_optimizer_is_sgd_and_factory_works():
    m, data = nn.Linear(2, 2), [(torch.randn(2, 2), torch.zeros(2, dtype=torch.long))]
    opt = Recipe(m, data, nn.functional.cross_entropy).make_optimizer()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == 0.01
    r = Recipe(m, data, nn.functional.cross_entropy, optimizer=lambda ps: torch.optim.Adam(ps, lr=0.1))
    assert isinstance(r.make_optimizer(), torch.optim.Adam)
    bad = Recipe(m, data, nn.functional.cross_entropy, optimizer=lambda ps: None)
    with pytest.raises(NormscopeError, match="factory returned NoneType"):
        bad.make_optimizer()
