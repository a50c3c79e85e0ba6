// Cymmetri tags enterprise accounts by email domain.
const domain = event.user?.email?.split('@')[1] ?? '';
const tier = domain === 'cymmetri.io' ? 'enterprise' : 'self-serve';
api.state.set('tier', tier);
// A downstream Decision block reads:
// step.tag-account-tier.tier == "enterprise"
// and routes to the corporate login path.
