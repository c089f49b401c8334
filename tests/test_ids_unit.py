"""core.ids.uuid5 is uuid.uuid5, only faster: same value, same type, same behaviour."""

import pickle
import uuid

from hypothesis import given
from hypothesis import strategies as st

from core.ids import uuid5


@given(st.uuids(), st.text(max_size=300))
def test_equals_the_standard_library(namespace: uuid.UUID, name: str) -> None:
    name = name.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    ours, theirs = uuid5(namespace, name), uuid.uuid5(namespace, name)
    assert ours == theirs and ours.int == theirs.int and str(ours) == str(theirs)
    assert hash(ours) == hash(theirs) and ours.version == 5 and ours.variant == uuid.RFC_4122


def test_behaves_like_a_uuid() -> None:
    u = uuid5(uuid.NAMESPACE_URL, "https://example.com/a")
    assert type(u) is uuid.UUID
    assert u.bytes == uuid.uuid5(uuid.NAMESPACE_URL, "https://example.com/a").bytes
    assert pickle.loads(pickle.dumps(u)) == u
    assert {u: 1}[uuid.UUID(str(u))] == 1
