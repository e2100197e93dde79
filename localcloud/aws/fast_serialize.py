"""moto's response serializer, made cheaper without changing a byte it writes.

moto 5.2 picks every attribute of every response object through alias providers (six classes,
instantiated per attribute) and matches the attribute's path against every response transformer
(`str.endswith` per transformer per attribute). What they decide depends only on the object's
class, the attribute and the model shape (a persistent object of the cached service model), and
on the path: both are remembered here. With a hundred instances DescribeInstances spent most of
its time there.
"""

from moto.core import serialize
from moto.core.utils import MISSING, get_value

_UNSEEN = object()


def install():
    picker = serialize.AttributePicker
    keys_seen = {}
    transforms_seen = {}

    def possible_keys(self, context):
        # The shape is part of the key by identity: the service model is cached for the process,
        # so each shape (and the parent moto sets on it) lives as long as the cache.
        k = (type(self), type(context.obj), context.key, id(context.shape))
        keys = keys_seen.get(k)
        if keys is None:
            keys = tuple(dict.fromkeys(self.get_possible_keys(context)))
            keys_seen[k] = keys
        return keys

    def call(self, context):
        obj = context.obj
        value = None
        for possible_key in possible_keys(self, context):
            found = get_value(obj, possible_key, MISSING)
            if found is not MISSING:
                value = found
                break
        transformers = self.response_transformers
        if transformers:
            key_path = f"{context.key_path}.{context.key}"
            k = (id(transformers), key_path)
            transform = transforms_seen.get(k, _UNSEEN)
            if transform is _UNSEEN:
                transform = next((t for p, t in transformers.items() if key_path.endswith(p)), None)
                transforms_seen[k] = transform
            if transform is not None:
                value = transform(value)
        return value

    picker.__call__ = call
