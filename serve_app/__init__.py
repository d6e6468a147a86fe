"""genguard's Ray Serve application: HTTP router, engines, model deployments."""
