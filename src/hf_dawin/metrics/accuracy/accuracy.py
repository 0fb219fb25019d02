"""Classification accuracy as an `evaluate` metric module, computed with scikit-learn.

Load it by path, which needs no Hub access:
`evaluate.load("<package>/metrics/accuracy")` or `hf_dawin.scoring.load_metric("accuracy")`.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


_DESCRIPTION = """
Accuracy is the fraction of examples whose predicted class equals the reference class:
(number of correct predictions) / (number of examples). With `normalize=False` it is the
count of correct predictions instead.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class indices.
    references (`list` of `int`): Reference class indices, one per prediction.
    normalize (`bool`, defaults to `True`): Return the fraction correct; `False` returns the count.
    sample_weight (`list` of `float`, *optional*): Weight of each example.

Returns:
    accuracy (`float` or `int`): Fraction (0 to 1) or count of correct predictions.

Example:
    >>> import evaluate
    >>> accuracy = evaluate.load("path/to/hf_dawin/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 2, 1, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
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
class Accuracy(evaluate.Metric):
    """Accuracy of single-label class predictions."""

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
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score) if normalize or sample_weight is not None else int(score)}
