const tier = event.user?.app_metadata?.tier ?? 'free';
// Persist any tier change from this run.
api.user.setAppMetadata({ tier });
// Embed in the current token.
api.session.setCustomClaim('tier', tier);
