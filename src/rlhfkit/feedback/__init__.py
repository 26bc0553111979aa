"""Human feedback: simulated labelers (the web app, consensus and agreement statistics come next)."""
