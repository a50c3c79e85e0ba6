const existing = event.user?.app_metadata?.address ?? {};
api.user.setAppMetadata({ address: { ...existing, country: event.request.geo.country },});
