"""Loyalty: programmes, earning rules, the points ledger, tiers, rewards and expiry."""
