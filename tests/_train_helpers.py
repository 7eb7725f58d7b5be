"""Shared by the training tests: set dotted fields of an ml_collections config."""


def with_fields(config, fields: dict):
    for key, value in fields.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
