"""Deployment manifests of a fleet, rendered from its run config (`cord-coord ops
render`): Kubernetes with KEDA autoscaling (`k8s`) and SkyPilot tasks (`render`)."""
