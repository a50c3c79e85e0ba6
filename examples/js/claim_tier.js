// Cymmetri embeds the account tier in every access token.
const tier = event.user?.app_metadata?.tier ?? 'free';
api.session.setCustomClaim('tier', tier);api.session.setCustomClaim('geo_country', event.request.geo.country);
