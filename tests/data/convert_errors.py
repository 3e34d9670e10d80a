"""A converter's error as the converter tests check it: the message of the ConvertError raised."""
from __future__ import annotations

import pytest

from msrec_dist.data.convert.common import ConvertError


def convert_error(convert, *args, **kwargs) -> str:
    """The message of the ConvertError that convert(*args, **kwargs) must raise."""
    with pytest.raises(ConvertError) as err:
        convert(*args, **kwargs)
    return str(err.value)
