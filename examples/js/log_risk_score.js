api.log('info', `Risk score: ${event.authentication.risk_score}`);
// Or via console alias — same result:
console.warn(`Unrecognised country: ${event.request.geo.country}`);
