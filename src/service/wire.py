"""The reward service's JSON forms, defined in src/models/reward/wire.py (below both the service
and the HTTP client); re-exported here for the service's modules and older imports."""
from ..models.reward.wire import (ITEM_KEYS, WireError, check_path, data_url, decode_image,  # noqa: F401
                                  decode_item, decode_score_request, encode_image, encode_item, item_name,
                                  resolve_allowed_dirs)
