"""F1 score as an `evaluate` metric module, computed with scikit-learn, macro-averaged by default.

Load it by path, which needs no Hub access:
`evaluate.load("<package>/metrics/f1")` or `hf_dawin.scoring.load_metric("f1")`.

The default `average` is `"macro"`, not scikit-learn's `"binary"`, because the evaluation sets here
are multi-class and because `evaluate.combine` forwards every keyword argument of `compute` to
every combined module. `combine([accuracy, f1]).compute(..., average="macro")` therefore fails in
the accuracy module, so the combined metric relies on this default.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


_DESCRIPTION = """
The F1 score is the harmonic mean of precision and recall, 2 * precision * recall / (precision + recall).
For several classes, `average` selects how per-class scores combine: "macro" is their unweighted
mean, "weighted" weights them by class support, "micro" pools all decisions (equal to accuracy for
single-label classification), and None returns the per-class scores.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class indices.
    references (`list` of `int`): Reference class indices, one per prediction.
    labels (`list` of `int`, *optional*): Classes to include. Defaults to the classes present in
        predictions or references.
    pos_label (`int`, defaults to 1): The positive class when `average="binary"`.
    average (`str` or `None`, defaults to `"macro"`): One of "macro", "micro", "weighted",
        "binary" or None.
    sample_weight (`list` of `float`, *optional*): Weight of each example.
    zero_division (`"warn"`, `0.0`, `1.0` or `nan`, defaults to `"warn"`): Value for a class with
        no predicted and no reference examples. "warn" acts as 0 and warns.

Returns:
    f1 (`float`, or `list` of `float` when `average=None`): Between 0 and 1, higher is better.

Example:
    >>> import evaluate
    >>> f1 = evaluate.load("path/to/hf_dawin/metrics/f1")
    >>> f1.compute(predictions=[0, 1, 1, 2], references=[0, 1, 2, 2])
    {'f1': 0.7777777777777777}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O.
          and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A.
          and Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    """F1 score of single-label class predictions, macro-averaged unless another `average` is passed."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="macro",
        sample_weight=None,
        zero_division="warn",
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        if average is None:
            return {"f1": [float(value) for value in score]}
        return {"f1": float(score)}
