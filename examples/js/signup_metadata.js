// Cymmetri writes tier and signup country at registration.
api.user.setAppMetadata({ tier: 'enterprise', signup_country: event.request.geo.country, flagged_at: new Date().toISOString(),});
