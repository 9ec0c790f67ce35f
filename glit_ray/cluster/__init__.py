"""The Ray runtime every command shares: what work asks of the cluster (`resources`, `placement`), where runs keep
their files (`storage`, `mirror`), how a lost worker is retried (`failure_policy`), and Ray's private paths we rely on,
in one place (`ray_workarounds`). It knows nothing of models."""
