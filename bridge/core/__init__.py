"""Protocol-neutral core: message model, links, policy, routing."""
