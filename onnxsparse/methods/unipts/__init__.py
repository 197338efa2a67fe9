"""UniPTS (Xie et al., CVPR 2024): reducing-regrowing allocation search, base-decayed distillation and
dynamic sparse training, label-free, on any imported model.

Phases (``MethodResult.info`` reports each):

1. allocation: the evolutionary search over reduce-regrow genomes (:mod:`.search`), scored by agreement with
   the dense teacher after statistics correction; the uniform and global-magnitude allocations are scored the
   same way and the fittest is kept. Every candidate respects the per-layer caps (``max_layer_sparsity``, and
   the global target for the first, last and small layers: :func:`onnxsparse.sparsity.allocation.layer_caps`);
2. start: two starting points for distillation, scored on the calibration selection: the magnitude-pruned model
   after the statistics correction that agrees best, and the layer-wise reconstruction of the same allocation
   (:func:`onnxsparse.methods.reconstruct.reconstruct_all`); the better one is trained;
3. training: dynamic sparse training with the per-output objective (:mod:`.dst`, :mod:`.objective`), on the
   signal each output describes (:mod:`onnxsparse.signals`: logits behind a Softmax, per position for
   sequences, ...), plus the distance of every prunable layer's output to the teacher's (``feature_weight``;
   the paper distils the outputs alone);
4. finish: masks baked (exactly the allotted zeros per layer), the statistics correction chosen again on the
   selection ("none" included), and the trained model kept only if it agrees with the dense model on the selection
   better than the starting point by a margin the selection can resolve (``KEEP_TRAINED_Z`` standard errors of
   the paired per-sample difference, or ``KEEP_TRAINED_MARGIN`` of the start's distance), unless a sign test
   resolves it as farther on most selection samples: UniPTS never ends below its own start on the selection.

The quick recipe plans its search generations and training iterations from counted work (:mod:`.plan`: the
model's multiply-accumulates and output elements, sample counts), so the same command, seed, device and thread
count give the same model on any machine. ``UniPTSConfig.time_budget`` is an optional wall-clock cap on top: a
run it cuts says so (report and stderr) and is not reproducible.

Modules: :mod:`.method` (the orchestration; this package only exports), :mod:`.candidate` (versions of the
student as values: captured, compared, materialised), :mod:`.search` (genome maths and the evolution),
:mod:`.evaluator` (an allocation's fitness, in the correction mode the caller names), :mod:`.plan` (the work plan
and the training plan), :mod:`.dst` (the training loop), :mod:`.feed` (its batches), :mod:`.flip` (whether
augmentation mirrors), :mod:`.objective` (the loss), :mod:`.keep` (trained against start).
"""

from onnxsparse.methods.unipts.candidate import Candidate, materialise
from onnxsparse.methods.unipts.keep import KEEP_TRAINED_MARGIN, KEEP_TRAINED_Z
from onnxsparse.methods.unipts.method import UniPTS, autocast_for
from onnxsparse.methods.unipts.plan import DEFAULT_LR

__all__ = ["DEFAULT_LR", "KEEP_TRAINED_MARGIN", "KEEP_TRAINED_Z", "Candidate", "UniPTS", "autocast_for",
           "materialise"]
