"""Bug: a pruned conv (``torch.nn.utils.prune``: ``weight = weight_orig * weight_mask``,
recomputed by a forward pre-hook) and the old hook-based ``weight_norm`` were folded into a
weight the pre-hook overwrites at the next forward: wrong model. Now pruning/weight norm are
made permanent first (exact) and the fold goes into that weight."""

import pytest
import torch
from fold_testlib import both_paths, randomize_all, rel_err
from torch import nn
from torch.nn.utils import prune

from normscope.fold import fold_bn
from normscope.fold.api import clone_model


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", ["prune", "old_weight_norm"])
def test_pruned_or_weight_normed_conv_folds_exactly(kind):
    base = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), "neg_gamma").double()
    if kind == "prune":
        prune.l1_unstructured(base[0], "weight", amount=0.5)
    else:
        nn.utils.weight_norm(base[0])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    for path, model in both_paths(base):
        ref = clone_model(model)
        res = fold_bn(model, x)
        assert res.tracing == path and len(res.folded) == 1
        assert res.folded[0].materialized == ["pruning of weight" if kind == "prune" else "weight_norm of weight"]
        with torch.no_grad():
            assert rel_err(ref(x), res.model(x)) <= 1e-12
            assert rel_err(ref(x), res.model(x * 1.0)) <= 1e-12  # a second forward: nothing re-applied
            assert torch.equal(ref(x), model(x))
    if kind == "prune":
        folded = res.model.inner[0]
        assert not hasattr(folded, "weight_orig") and int((folded.weight == 0).sum()) == 4 * 3 * 9 // 2
