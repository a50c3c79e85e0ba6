const res = await api.fetch('https://risk.cymmetri.io/v1/score', { method: 'POST', body: JSON.stringify({ ip: event.request.ip }), headers: { 'Content-Type': 'application/json' },});
const score = JSON.parse(res.body).score ?? 0;
api.log('info', `Risk score from external API: ${score}`);
if (score > 90) { api.deny('external-risk-score-too-high'); return;}
api.state.set('external_risk_score', score);
