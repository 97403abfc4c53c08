"""An adapter travels packed: one manifest and one buffer, whatever its number of arrays (issue 21)."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedbilevel import protocol
from fedbilevel.strategies.replies import RejectedReply, check_adapter


def _mixed_adapter() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layers.1.lora_B.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "layers.0.lora_A.weight": rng.standard_normal((5, 7)).astype(np.float64),
        "scale": np.float16(0.5) * np.ones((), np.float16),  # 0-d, 2 bytes
        "empty": np.zeros((0, 4), np.float32),
        "steps": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2],  # not contiguous
        "mask": np.array([True, False, True]),
    }


def test_a_packed_adapter_comes_back_equal_in_names_order_dtypes_and_shapes():
    adapter = _mixed_adapter()
    back = protocol.record_to_adapter(protocol.adapter_to_record(adapter))
    assert list(back) == list(adapter)
    for name, array in adapter.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
    assert protocol.adapter_digest(back) == protocol.adapter_digest(adapter)


def test_unpacked_arrays_are_writable_aligned_and_independent():
    back = protocol.record_to_adapter(protocol.adapter_to_record(_mixed_adapter()))
    for name, array in back.items():
        assert array.flags.writeable and array.flags.aligned, name
    before = back["layers.0.lora_A.weight"].copy()
    back["layers.1.lora_B.weight"][...] = 7.0  # writes its own bytes only
    np.testing.assert_array_equal(back["layers.0.lora_A.weight"], before)


def test_a_message_carries_the_same_few_objects_for_240_arrays_as_for_one():
    """Flower pulls each object of a message separately: the count must not grow with the arrays."""
    many = {f"layers.{i}.lora_A.weight": np.full((8, 64), i, np.float32) for i in range(240)}
    one = {"all": np.concatenate([a.ravel() for a in many.values()])}

    def objects(adapter):
        return len(get_all_nested_objects(RecordDict({protocol.ARRAYS: protocol.adapter_to_record(adapter)})))

    assert objects(many) == objects(one) <= 6
    # Unpacked, the same adapter is one object per array (and its chunk) and more.
    unpacked = ArrayRecord({name: Array(array) for name, array in many.items()})
    assert len(get_all_nested_objects(RecordDict({protocol.ARRAYS: unpacked}))) > 240


def test_arrays_of_objects_or_strings_cannot_travel():
    with pytest.raises(ValueError, match="array 'names': dtype <U3 cannot travel"):
        protocol.adapter_to_record({"names": np.array(["abc"])})


def _packed(manifest: bytes, packed: np.ndarray) -> ArrayRecord:
    """A hand-made packed record: the manifest's JSON text and the buffer as given."""
    return ArrayRecord(
        {protocol.MANIFEST: Array(np.frombuffer(manifest, np.uint8).copy()), protocol.PACKED: Array(packed)}
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        # What an older version sent: one Array per name.
        (ArrayRecord({"w": Array(np.ones(3, np.float32))}), "not a packed adapter: entries \\['w'\\]"),
        (_packed(b"[[", np.zeros(8, np.uint8)), "unreadable packed adapter"),
        # The manifest claims more bytes than were sent.
        (_packed(b'[["w", "<f4", [4], 0]]', np.zeros(8, np.uint8)), "array 'w': bytes \\[0, 16\\) outside"),
        (_packed(b'[["w", "|O", [1], 0]]', np.zeros(8, np.uint8)), "array 'w': dtype object is not numeric"),
        (_packed(b'[["w", "<f4", [2], 0]]', np.zeros(2, np.float32)), "'packed' is float32 of shape \\(2,\\)"),
    ],
)
def test_a_reply_whose_adapter_is_not_packed_is_rejected_with_the_reason(record, reason):
    reference = {"w": np.zeros(2, np.float32)}
    with pytest.raises(RejectedReply, match=reason):
        check_adapter(RecordDict({protocol.ARRAYS: record}), reference)
