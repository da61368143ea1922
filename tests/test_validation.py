"""fkdstore.validation: the shared argument checks and their message convention."""

import numpy as np
import pytest

from fkdstore.errors import ValidationError
from fkdstore.validation import non_negative_int, positive_int


def test_positive_int():
    assert positive_int("n", 1) == 1 and positive_int("n", np.int64(7)) == 7
    assert type(positive_int("n", np.uint8(3))) is int
    with pytest.raises(ValidationError, match=r"^num_images must be a positive integer. Got 0.$"):
        positive_int("num_images", 0)
    with pytest.raises(ValidationError, match=r"^n must be a positive integer. Got -3.$"):
        positive_int("n", np.int32(-3))
    for bad, shown in ((True, "True (bool)"), (2.0, "2.0 (float)"), ("2", "'2' (str)"), (None, "None (NoneType)")):
        pattern = rf"^n must be a positive integer. Got {shown}.$".replace("(", r"\(").replace(")", r"\)")
        with pytest.raises(TypeError, match=pattern):
            positive_int("n", bad)


def test_non_negative_int():
    assert non_negative_int("workers", 0) == 0 and non_negative_int("workers", 5) == 5
    with pytest.raises(ValidationError, match=r"^workers must be a non-negative integer. Got -1.$"):
        non_negative_int("workers", -1)
    with pytest.raises(TypeError, match="workers must be a non-negative integer"):
        non_negative_int("workers", False)


def test_validation_error_is_a_value_error():
    with pytest.raises(ValueError):
        positive_int("n", 0)
