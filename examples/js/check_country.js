const country = event.request.geo.country;
const blocked = ['XX', 'YY'].includes(country);
api.log( blocked ? 'warn' : 'info', `Login from ${country} — blocked: ${blocked}`,);
api.state.set('country_blocked', blocked);
// Downstream Decision block:
// step.check-country.country_blocked == true → Deny block
// step.check-country.country_blocked == false → continue
